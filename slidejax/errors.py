"""The one exception type slidejax raises for bad input and infeasible settings.

Its message is a single line naming the file, field or line at fault; the CLI prints it without a
traceback and exits non-zero.
"""


from pathlib import Path


class SlidejaxError(Exception):
    """A user-facing error: bad input, an unsupported model, an infeasible setting."""


def writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check a file can be written there, or raise one clear line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".slidejax_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SlidejaxError(f"{path}: cannot write the output folder (not writable: {e.strerror or e})") from None
    return path
