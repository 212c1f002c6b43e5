#!/usr/bin/env bash
# Fresh virtual environment -> torch 2.13 (CPU) -> build the samkernels wheel against it (no build
# isolation) -> install the wheel -> run the test suite against the *installed* package.
# Extra arguments go to pytest (e.g. -k bsam).  .ci/run calls exactly this script.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SAMKERNELS_VENV:-$REPO/.venv-test}"

rm -rf "$VENV" "$REPO/dist" "$REPO/build"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q "torch==2.13.0" "setuptools>=64" wheel ninja
pip install -q numpy pytest pytest-benchmark hypothesis triton mnist1d scikit-learn matplotlib tqdm

pip wheel -q --no-build-isolation --no-deps -w "$REPO/dist" "$REPO"
pip install -q --no-deps "$REPO"/dist/samkernels-*.whl

cd "$REPO/tests"
# nvcc missing = a failing test, not a skip (SAMKERNELS_REQUIRE_NVCC=0 on a machine without it)
SAMKERNELS_REQUIRE_NVCC="${SAMKERNELS_REQUIRE_NVCC:-1}" SAMKERNELS_TEST_INSTALLED=1 TRITON_INTERPRET=1 python -P -m pytest -p no:cacheprovider -q \
  --durations=15 "$@"
