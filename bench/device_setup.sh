# Prepares the GPU machine for the benchmarks. Source it from the repository root, with `.whl`
# carried (the wheels and the DeepSpeed sdist that machine lacks, see bench/README.md):
#
#     source bench/device_setup.sh [--build-cpu-adam]
#
# It installs the carried wheels into /tmp/site, builds DeepSpeed from its sdist offline into the
# same folder (DS_BUILD_OPS=0: no op is compiled now), installs slidejax editable, exports
# PYTHONPATH and prints the versions that matter. --build-cpu-adam also JIT-builds DeepSpeed's CPU
# Adam now (about a minute; otherwise the DeepSpeed baseline builds it on its first run, before
# measuring, and caches it for later runs on the same machine). Safe to source again on a warm
# machine: installed pieces are kept. Returns non-zero, without leaving the shell, on failure.

_slidejax_device_setup() {
    local site=/tmp/site t0=$SECONDS
    if [ ! -f pyproject.toml ] || [ ! -d .whl ]; then
        echo "device_setup: run from the repository root with .whl carried (missing: $([ -f pyproject.toml ] || echo pyproject.toml) $([ -d .whl ] || echo .whl))" >&2
        return 1
    fi
    mkdir -p "$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export PIP_DISABLE_PIP_VERSION_CHECK=1

    # Wheels: reinstalled only when the set of carried files changed.
    local stamp
    stamp=$(ls -l .whl | md5sum | cut -c1-12)
    if [ ! -f "$site/.setup-$stamp" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl || { echo "device_setup: wheel install failed" >&2; return 1; }
        local sdist
        sdist=$(ls .whl/deepspeed-*.tar.gz 2>/dev/null | head -n 1)
        if [ -z "$sdist" ]; then
            echo "device_setup: no .whl/deepspeed-*.tar.gz" >&2
            return 1
        fi
        DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps \
            --no-build-isolation --no-cache-dir --upgrade --target "$site" "$sdist" \
            || { echo "device_setup: DeepSpeed build from $sdist failed" >&2; return 1; }
        touch "$site/.setup-$stamp"
    fi

    # slidejax editable (its kernels/ folder installs as slidejax.kernels); skipped when this
    # checkout already is the installed one.
    if ! python3 -c "import os, slidejax.kernels as k; assert k.__file__.startswith(os.getcwd() + '/')" 2>/dev/null; then
        python3 -m pip install -q --no-deps --no-build-isolation -e . \
            || { echo "device_setup: slidejax editable install failed" >&2; return 1; }
    fi

    python3 - <<'EOF' || { echo "device_setup: an import failed (above)" >&2; return 1; }
import importlib, importlib.metadata, os, sys, sysconfig
failed = []
for name in ("torch", "transformers", "jax", "jax_triton", "deepspeed", "pydantic", "typing_extensions", "slidejax"):
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        failed.append(name)
        print(f"  {name:18s} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
        continue
    try:
        version = importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = getattr(mod, "__version__", "")
    print(f"  {name:18s} {version:14s} {os.path.dirname(mod.__file__ or '')}")
import torch, jax
print(f"  torch CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}; jax devices {jax.devices()}")
if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    print("  WARNING: Python.h missing: DeepSpeed's CPU Adam cannot be JIT-built; the DeepSpeed "
          "baseline will fall back to torch AdamW and say so in its notes")
sys.exit(1 if failed else 0)
EOF

    if [ "${1:-}" = "--build-cpu-adam" ]; then
        if python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
                > /tmp/cpu_adam_build.log 2>&1; then
            echo "  DeepSpeed CPU Adam built ($((SECONDS - t0)) s so far)"
        else
            echo "  WARNING: DeepSpeed CPU Adam build failed; the baseline will fall back to torch AdamW:"
            tail -n 5 /tmp/cpu_adam_build.log
        fi
    fi
    echo "device_setup: done in $((SECONDS - t0)) s; PYTHONPATH=$PYTHONPATH"
}
_slidejax_device_setup "$@"
