#!/usr/bin/env bash
# The test command (README, .ci/run): for each tested torch stack, a fresh virtual environment ->
# torch -> the samkernels wheel built against it (no build isolation) -> install the wheel -> the
# tests against the *installed* package.
#
#   torch 2.13.0 (CPU build)            the whole suite, Triton's interpreter (Triton 3.9), the CUDA
#                                       sources compiled with nvcc, every Triton kernel compiled
#                                       ahead of time for sm_80/sm_90, the GPU-session dry run, the
#                                       Lightning / Transformers / Accelerate integrations
#   torch 2.11.0+cu130 (Triton 3.6)     the GPU machines' stack: wheel built WITH the CUDA kernels
#   torch 2.14.1+cu130 (Triton 3.8)     (sm_90), imported, then the ops, optimizer, compile,
#                                       Triton-interpreter and ahead-of-time compile tests
#
# Extra arguments go to pytest of the first stack (e.g. -k bsam).  SAMKERNELS_STACKS picks stacks
# (default: all three, e.g. SAMKERNELS_STACKS=2.13.0 for the quick CPU run).  The CUDA stacks'
# torch wheels (several GB) download in the background while the first stack builds and tests.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SAMKERNELS_VENV:-$REPO/.venv-test}"
STACKS="${SAMKERNELS_STACKS:-2.13.0 2.11.0 2.14.1}"
# What the CUDA stacks run (the whole suite is run once, on 2.13; these are the files that touch
# the compiled ops, the optimizers, torch.compile and Triton).
CUDA_STACK_TESTS="test_ops.py test_vi_ops.py test_optim.py test_compile.py test_dispatch.py
  test_bisam_loss.py test_triton_ops.py test_triton_vi.py test_nonfinite_device.py
  test_norm_contract.py test_triton_aot.py test_precision.py"
COMMON_PKGS=(numpy pytest hypothesis "setuptools>=64" wheel ninja)
SECONDS=0

log() { echo "=== [$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }

# A venv with torch $1 and the test requirements ($2..: extra packages).
make_venv() {
  local venv="$1" version="$2"; shift 2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$version" "${COMMON_PKGS[@]}" "$@"
}

# Build the wheel against the venv's torch and install it ($3: extra environment for the build).
build_and_install() {
  local venv="$1" dist="$2"; shift 2
  rm -rf "$dist" "$REPO/build"
  env "$@" "$venv/bin/pip" wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
    -w "$dist" "$REPO"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "$dist"/samkernels-*.whl
}

run_pytest() {  # venv, pytest args...
  local venv="$1"; shift
  (cd "$REPO/tests" &&
   SAMKERNELS_REQUIRE_NVCC="${SAMKERNELS_REQUIRE_NVCC:-1}" SAMKERNELS_TEST_INSTALLED=1 \
   TRITON_INTERPRET=1 "$venv/bin/python" -P -m pytest -p no:cacheprovider -q --durations=10 "$@")
}

# --- start the CUDA stacks' venvs now: mostly download / unpack, overlapping the first stack ----
declare -A PREP_PID
for version in $STACKS; do
  [ "$version" = "2.13.0" ] && continue
  v="$REPO/.venv-test-torch$version"
  log "preparing venv for torch $version in the background"
  make_venv "$v" "$version" > "$REPO/.venv-prep-$version.log" 2>&1 &
  PREP_PID[$version]=$!
done

# --- torch 2.13 (CPU): the whole suite --------------------------------------------------------
if [[ " $STACKS " == *" 2.13.0 "* ]]; then
  log "torch 2.13.0: venv"
  rm -rf "$VENV" "$REPO/dist" "$REPO/build"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" "${COMMON_PKGS[@]}"
  "$VENV/bin/pip" install -q --disable-pip-version-check pytest-benchmark triton mnist1d \
    scikit-learn matplotlib tqdm lightning transformers accelerate
  log "torch 2.13.0: build + install"
  build_and_install "$VENV" "$REPO/dist"
  log "torch 2.13.0: the whole suite"
  # nvcc missing = a failing test, not a skip (SAMKERNELS_REQUIRE_NVCC=0 on a machine without it)
  run_pytest "$VENV" "$@"
fi

# --- the CUDA stacks --------------------------------------------------------------------------
for version in $STACKS; do
  [ "$version" = "2.13.0" ] && continue
  v="$REPO/.venv-test-torch$version"
  log "torch $version: waiting for its venv"
  if ! wait "${PREP_PID[$version]}"; then
    cat "$REPO/.venv-prep-$version.log"
    echo "venv for torch $version failed" >&2
    exit 1
  fi
  "$v/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  log "torch $version: build with the CUDA kernels (sm_90) + install"
  build_and_install "$v" "$REPO/dist-torch$version" SAMKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
    CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="$(nproc)"
  (cd /tmp && "$v/bin/python" -c "
import samkernels, torch
from samkernels import _dispatch
assert _dispatch.cuda_kernels_built(), 'the CUDA kernels were not built'
print('samkernels imports against torch', torch.__version__, '- CUDA kernels built:', _dispatch.cuda_kernels_built())")
  log "torch $version: tests"
  # shellcheck disable=SC2086
  run_pytest "$v" $CUDA_STACK_TESTS
done
log "all stacks passed: $STACKS"
