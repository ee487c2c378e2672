"""The one exception type slidejax raises for bad input and infeasible settings.

Its message is a single line naming the file, field or line at fault; the CLI prints it without a
traceback and exits non-zero.
"""


class SlidejaxError(Exception):
    """A user-facing error: bad input, an unsupported model, an infeasible setting."""
