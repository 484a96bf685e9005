#!/usr/bin/env bash
# Install Triton's perf_analyzer (C++ binary) for benchmarking innfer the way operators
# benchmark Triton: `perf_analyzer -m MODEL -u 127.0.0.1:8001 -i grpc`.
#
#   deploy/tools/install-perf-analyzer.sh      # idempotent; a second run takes seconds
#
# Result: runs/tools/bin/perf_analyzer, a wrapper that sets LD_LIBRARY_PATH to the CUDA
# runtime shipped by pip and execs the real binary from runs/tools/perf-analyzer/ (a venv
# of its own: the dev venv's tritonclient/protobuf must not change).
#
# Where the binary comes from:
#   1. PyPI `perf-analyzer>=2` (manylinux_2_38 wheels: glibc >= 2.38, e.g. Debian 13,
#      Ubuntu 24.04; its 0.1.0 release is an empty placeholder, hence the >=2);
#   2. else tritonclient 2.48, the last wheel that ships bin/perf_analyzer (manylinux1).
# tritonclient's binary links libb64.so.0d (Debian: libb64-0d) and libcudart.so.12 (PyPI:
# nvidia-cuda-runtime-cu12), the latter even when no GPU is used.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/runs/tools/perf-analyzer
WRAPPER=$ROOT/runs/tools/bin/perf_analyzer
PYTHON=${PYTHON:-python3}

die() { echo "install-perf-analyzer: $*" >&2; exit 1; }

# 1. libb64 from Debian (root only; otherwise say what to run).
# (grep without -q reads to the end: -q's early exit killed ldconfig with SIGPIPE now and
# then, and under pipefail the library read as missing - review helper-263)
if ! ldconfig -p 2>/dev/null | grep 'libb64\.so\.0d' >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d \
            >/dev/null; } || die "apt-get install libb64-0d failed"
    else
        die "libb64.so.0d is missing: run 'sudo apt-get install libb64-0d', then rerun $0"
    fi
fi

# 2. A venv with a package that provides a working binary, plus the CUDA runtime.
cudart_dir() {
    "$VENV/bin/python" -c \
        'import nvidia.cuda_runtime as m, os; print(os.path.join(m.__path__[0], "lib"))'
}
real_binary() { # the ELF itself: perf-analyzer's bin/perf_analyzer is a Python launcher
    local lib f   # that always exits 0
    lib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
        || return 1
    for f in "$lib/perf_analyzer/bin/perf_analyzer" "$VENV/bin/perf_analyzer"; do
        if [ -x "$f" ] && [ "$(head -c4 "$f" | tail -c3)" = ELF ]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}
works() { LD_LIBRARY_PATH="$(cudart_dir 2>/dev/null)" "$(real_binary 2>/dev/null)" --version >/dev/null 2>&1; }

if ! works; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv failed"
    pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" nvidia-cuda-runtime-cu12 || die "pip install nvidia-cuda-runtime-cu12 failed"
    if ! { "${pip[@]}" 'perf-analyzer>=2' 2>/dev/null && works; }; then
        echo "install-perf-analyzer: PyPI perf-analyzer is not usable here (needs glibc >= 2.38;" \
            "this is $(ldd --version | awk 'NR==1{print $NF}')): using tritonclient 2.48's binary"
        "$VENV/bin/python" -m pip uninstall --quiet -y perf-analyzer 2>/dev/null || true
        # The wheel carries bin/perf_analyzer; its Python deps (numpy, ...; 80 MB) and the
        # [all] extra's are for the Python client, which this venv is not for.
        "${pip[@]}" --no-deps 'tritonclient==2.48.*' || die "pip install tritonclient==2.48.* failed"
    fi
fi
BIN=$(real_binary) || die "no perf_analyzer binary in $VENV"
CUDART=$(cudart_dir) || die "nvidia-cuda-runtime-cu12 is not importable in $VENV"

# 3. The wrapper.
mkdir -p "$(dirname "$WRAPPER")"
cat >"$WRAPPER" <<EOF
#!/bin/sh
# Written by deploy/tools/install-perf-analyzer.sh: perf_analyzer with pip's libcudart.
LD_LIBRARY_PATH="$CUDART\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$BIN" "\$@"
EOF
chmod +x "$WRAPPER"
"$WRAPPER" --version >/dev/null 2>&1 \
    || die "$WRAPPER does not start: $("$WRAPPER" --version 2>&1 | head -3)"
echo "perf_analyzer: $WRAPPER ($("$WRAPPER" --version 2>&1 | head -1); binary $BIN)"
