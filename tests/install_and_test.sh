#!/usr/bin/env bash
# The test command (README, .ci/run): for each tested torch stack, a fresh virtual environment ->
# torch -> the samkernels wheel built against it (no build isolation) -> install the wheel -> the
# tests against the *installed* package.
#
#   torch 2.13.0 (CPU build)            the suite (pytest -n auto: Triton's interpreter (Triton
#                                       3.9), the Lightning / Transformers / Accelerate
#                                       integrations ...), then the offline GPU checks: the CUDA
#                                       sources compiled with nvcc, every Triton kernel compiled
#                                       ahead of time for sm_90 (each kernel for sm_80 too), the
#                                       GPU-session dry run
#   torch 2.11.0+cu130 (Triton 3.6)     the GPU machines' stack: wheel built WITH the CUDA kernels
#   torch 2.14.1+cu130 (Triton 3.8)     (sm_90), imported, then the ops, optimizer, compile,
#                                       Triton-interpreter and ahead-of-time compile tests
#
# Extra arguments go to the torch 2.13 suite's pytest (e.g. -k bsam).  SAMKERNELS_STACKS picks stacks
# (default: all three, e.g. SAMKERNELS_STACKS=2.13.0 for the quick CPU run).
#
# Disk: a CUDA stack's venv is about 6 GB (torch + the nvidia libraries), so stacks run one after
# another, each in a fresh venv that is deleted when its tests pass (SAMKERNELS_KEEP_VENVS=1 keeps
# them), and pip keeps no cache: at most one venv exists at a time, about 6 GB at the peak.  Each
# stack first checks the free space and stops with a clear message if it cannot fit.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SAMKERNELS_VENV:-$REPO/.venv-test}"
STACKS="${SAMKERNELS_STACKS:-2.13.0 2.11.0 2.14.1}"
KEEP_VENVS="${SAMKERNELS_KEEP_VENVS:-0}"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# What the CUDA stacks run (the whole suite is run once, on 2.13; these are the files that touch
# the compiled ops, the optimizers, torch.compile and Triton).
CUDA_STACK_TESTS="test_contract.py test_oracles.py test_triton_plans.py test_optim.py test_compile.py
  test_dispatch.py test_bisam_loss.py test_nonfinite_device.py test_norm_contract.py
  test_triton_aot.py test_precision.py test_check_fused.py test_fsdp.py"
COMMON_PKGS=(numpy pytest pytest-xdist hypothesis "setuptools>=64" wheel ninja)
# The offline GPU checks (tests/conftest.py OFFLINE_GPU_CHECKS): nvcc, Triton's sm_90 compiler and
# the GPU session's dry run, about as much CPU as the rest of the suite; `pytest` leaves them out,
# the torch 2.13 stack runs them after the suite (the CUDA stacks name test_triton_aot.py).
OFFLINE_GPU_TESTS="test_cuda_compile.py test_triton_aot.py test_gpu_session.py"
SECONDS=0

log() { echo "=== [$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }

free_gb() { df -Pk "$REPO" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'; }

# Stop early, naming the stack, when the disk cannot hold its venv ($1: GB needed, $2: what for).
need_disk() {
  local free; free="$(free_gb)"
  log "disk: ${free} GB free in $REPO, about $1 GB needed for $2"
  if [ "$free" -lt "$1" ]; then
    echo "not enough disk for $2: ${free} GB free in $REPO, about $1 GB needed" >&2
    exit 1
  fi
}

# A fresh venv with torch $2 and the test requirements ($3..: extra packages).
make_venv() {
  local venv="$1" version="$2"; shift 2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$version" "${COMMON_PKGS[@]}" "$@"
}

drop_venv() { [ "$KEEP_VENVS" = 1 ] || rm -rf "$1"; }

# Build the wheel against the venv's torch and install it ($3: extra environment for the build).
build_and_install() {
  local venv="$1" dist="$2"; shift 2
  rm -rf "$dist" "$REPO/build"
  env "$@" "$venv/bin/pip" wheel -q --no-build-isolation --no-deps \
    -w "$dist" "$REPO"
  "$venv/bin/pip" install -q --no-deps "$dist"/samkernels-*.whl
}

# venv, pytest args...  (with -n auto: a pytest-xdist worker per core; tests/conftest.py's
# pytest_xdist_make_scheduler keeps each module's tests on one worker)
run_pytest() {
  local venv="$1"; shift
  (cd "$REPO/tests" &&
   SAMKERNELS_REQUIRE_NVCC="${SAMKERNELS_REQUIRE_NVCC:-1}" SAMKERNELS_TEST_INSTALLED=1 \
   TRITON_INTERPRET=1 "$venv/bin/python" -P -m pytest -p no:cacheprovider -q --durations=10 "$@")
}

# --- torch 2.13 (CPU): the whole suite --------------------------------------------------------
if [[ " $STACKS " == *" 2.13.0 "* ]]; then
  need_disk 3 "the torch 2.13.0 venv"
  log "torch 2.13.0: venv"
  rm -rf "$REPO/dist" "$REPO/build"
  # the peers the tests compare with: ivon-opt (tests/test_ivon.py), pytorch_optimizer
  # (tests/test_sam_variants.py)
  make_venv "$VENV" 2.13.0 pytest-benchmark triton mnist1d scikit-learn matplotlib tqdm \
    lightning transformers accelerate ivon-opt==0.1.3 pytorch_optimizer==4.1.0
  log "torch 2.13.0: build + install"
  build_and_install "$VENV" "$REPO/dist"
  log "torch 2.13.0: the suite"
  run_pytest "$VENV" -n auto "$@"
  log "torch 2.13.0: the offline GPU checks"
  # nvcc missing = a failing test, not a skip (SAMKERNELS_REQUIRE_NVCC=0 on a machine without it);
  # one process: its three modules' compilers run as background jobs beside each other
  # shellcheck disable=SC2086
  run_pytest "$VENV" $OFFLINE_GPU_TESTS
  drop_venv "$VENV"
fi

# --- the CUDA stacks, one at a time ------------------------------------------------------------
for version in $STACKS; do
  [ "$version" = "2.13.0" ] && continue
  v="$REPO/.venv-test-torch$version"
  need_disk 7 "the torch $version+cu130 venv and the CUDA build"
  log "torch $version: venv"
  make_venv "$v" "$version"
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
  run_pytest "$v" -n auto $CUDA_STACK_TESTS
  drop_venv "$v"
  rm -rf "$REPO/dist-torch$version" "$REPO/build"
done
log "all stacks passed: $STACKS"
