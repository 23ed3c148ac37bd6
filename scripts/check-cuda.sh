#!/usr/bin/env bash
# Proves, on a machine with no GPU and no system CUDA toolkit, that the engine's `cuda` feature
# (candle-core/cuda) compiles: installs a CUDA 13.4 toolkit from NVIDIA's PyPI wheels into the
# cache ($TESSERA_HOME/cuda-13.4.92, default ~/.cache/tessera; never into the repo), then runs
#   cargo check -p tessera-engine --features cuda --all-targets   (the library and its CUDA tests)
#   cargo build -p tessera-engine --features cuda --release
# in its own target dir (target/cuda), at low priority. `--check-only` skips the build.
# candle-kernels' build script runs nvcc on every kernel, for `cargo check` and again for the
# release build: ~15 min each on one busy core, seconds once built.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VER=13.4.92
TOOLKIT="${TESSERA_HOME:-$HOME/.cache/tessera}/cuda-$CUDA_VER"
CUDA_ROOT="$TOOLKIT/nvidia/cu13"   # the cu13 wheels share one CUDA_HOME-like tree: bin/ include/ lib/ nvvm/

die() { echo "check-cuda: $*" >&2; exit 1; }

# 1. The toolkit, from PyPI (pinned; --no-deps so nothing unpinned is pulled in). What each gives:
#    nvcc: nvcc, ptxas, fatbinary, nvlink; nvvm: cicc, libdevice; crt: crt/ headers nvcc needs;
#    runtime: cuda.h, cuda_runtime.h, cuda_fp16/bf16/fp8.h, libcudart; cccl: thrust/cub/libcu++.
#    No GPU libraries (cuBLAS, cuRAND, NVRTC) or driver (libcuda) are needed: nothing is linked.
if [ ! -f "$TOOLKIT/.complete" ]; then
    echo "check-cuda: installing CUDA $CUDA_VER wheels into $TOOLKIT" >&2
    rm -rf "$TOOLKIT"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$TOOLKIT" \
        nvidia-cuda-nvcc==$CUDA_VER nvidia-nvvm==$CUDA_VER nvidia-cuda-crt==$CUDA_VER \
        nvidia-cuda-runtime==$CUDA_VER nvidia-cuda-cccl==13.3.5.0.6 \
        || die "pip could not install the CUDA wheels (PyPI unreachable?)"
    # Linkers look for unversioned names; the wheels ship only libcudart.so.13.
    ln -sf libcudart.so.13 "$CUDA_ROOT/lib/libcudart.so"
    touch "$TOOLKIT/.complete"
fi
[ -x "$CUDA_ROOT/bin/nvcc" ] || die "no nvcc in $CUDA_ROOT/bin (delete $TOOLKIT and retry)"

# 2. The environment the build scripts read.
export PATH="$CUDA_ROOT/bin:$PATH"              # cudarc runs `nvcc --version` to pick its CUDA API
export CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT"  # cudarc's link search paths, cudaforge's nvcc
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"     # no nvidia-smi here: target sm_90a (H100/H200)
export CARGO_TARGET_DIR="$PWD/target/cuda"      # never the default target/ (others build there)
nvcc --version | grep -q "release ${CUDA_VER%.*}" || die "nvcc is not CUDA ${CUDA_VER%.*}: $(nvcc --version | tail -n 2)"

# 3. Compile.
nice -n 19 cargo check -p tessera-engine --features cuda --all-targets || die "cargo check --features cuda failed"
echo "check-cuda: cargo check -p tessera-engine --features cuda --all-targets: OK" >&2
if [ "${1:-}" != "--check-only" ]; then
    nice -n 19 cargo build -p tessera-engine --features cuda --release || die "cargo build --features cuda failed"
    echo "check-cuda: cargo build -p tessera-engine --features cuda --release: OK" >&2
fi
