#!/usr/bin/env bash
# One GPU lease, one command: build, GPU tests, backend tuning, step and loss benchmarks.
#
#   bash bench/gpu_session.sh OUTDIR                 # on a GPU machine (< 8 minutes)
#   bash bench/gpu_session.sh --cpu-dry-run OUTDIR   # here / in CI: toy sizes, Triton interpreted
#   options: --build (build the extension even without CUDA), --no-build (use the importable one)
#
# Stages (each keeps going when an earlier one fails; each has a time limit so the whole session
# ends inside its budget; rc, status and seconds of every stage go to OUTDIR/summary.md):
#   build  the extension for this GPU's architecture only, in a copy of the checkout
#          (python setup.py build_ext --inplace: no network, no pip; TORCH_CUDA_ARCH_LIST from
#          torch.cuda.get_device_capability, MAX_JOBS = cores, SAMKERNELS_CUDA=1)
#   tests  tests/test_gpu_ops.py (+ tests/test_norm_contract.py, tests/test_contract.py on a GPU),
#          TRITON_INTERPRET=0
#   tune   samkernels.tune_backend(): CUDA vs Triton kernels on this GPU
#   steps  bench/report.py: GPT-2-small, ResNet-50, 2,000 tiny tensors; fused CUDA / Triton
#          (nonfinite skip_on_device and unchecked), foreach, loop; copy-bandwidth floor;
#          launches per phase; measured vs the GPU targets (bench/cases.py)
#   loss   bench/bench_bisam_loss.py: BiSAM loss forward + backward vs the copy bandwidth
# OUTDIR receives at most 8 files (what a device lease brings back): session.log, gpu_tests.log,
# junit.xml, steps.md, steps.json, loss.md, loss.json, summary.md.
#
# Python: $PYTHON if set, else python3; the samkernels it imports is used unless the build stage
# built one (then PYTHONPATH points at the built copy).  The checkout is found from this file.
set -u

DRY=0
BUILD=auto
OUT=""
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    --build) BUILD=yes ;;
    --no-build) BUILD=no ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "gpu_session.sh: unknown option $arg" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_session.sh: one OUTDIR only" >&2; exit 2; }; OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: bash bench/gpu_session.sh [--cpu-dry-run] [--build|--no-build] OUTDIR" >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/samk_session.XXXXXX")"  # scratch: OUTDIR holds only the 8 files
LOG="$OUT/session.log"
: >"$LOG"
START=$(date +%s)

# Stage limits: (most seconds, seconds kept back for the stages after it); the budget bounds all.
if [ "$DRY" = 1 ]; then
  BUDGET=${SAMKERNELS_SESSION_BUDGET:-170}
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""   # the CPU path of the same script
  L_BUILD=(150 100); L_TESTS=(60 60); L_TUNE=(20 60); L_STEPS=(90 20); L_LOSS=(45 0)
else
  BUDGET=${SAMKERNELS_SESSION_BUDGET:-450}
  export TRITON_INTERPRET=0
  L_BUILD=(240 190); L_TESTS=(210 130); L_TUNE=(40 100); L_STEPS=(130 45); L_LOSS=(100 0)
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { echo "[session +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# --- stage bookkeeping -----------------------------------------------------------------------
STAGES=()
declare -A ST_STATUS ST_RC ST_SECS ST_LIMIT ST_NOTE
record() {  # name status rc secs limit note
  STAGES+=("$1"); ST_STATUS[$1]="$2"; ST_RC[$1]="$3"; ST_SECS[$1]="$4"; ST_LIMIT[$1]="$5"
  ST_NOTE[$1]="$6"
  say "stage $1: $2 (rc $3, $4 s of $5 s) $6"
}
limit_for() {  # max_seconds reserve_seconds_for_later_stages
  local left=$(( START + BUDGET - $(date +%s) - $2 ))
  [ "$left" -lt "$1" ] || left=$1
  [ "$left" -ge 5 ] || left=5
  echo "$left"
}
# run_stage NAME MAX RESERVE LOGFILE FUNCTION: the function runs under `timeout` in a subshell
run_stage() {
  local name=$1 max=$2 reserve=$3 logfile=$4 fn=$5 lim t0 rc status
  lim=$(limit_for "$max" "$reserve")
  say "stage $name: start (limit ${lim} s)"
  t0=$(date +%s)
  # STAGE_SIGNAL: what the limit sends first (INT lets pytest stop and still write junit.xml)
  timeout -s "${STAGE_SIGNAL:-TERM}" -k 20 "$lim" bash -c "$fn" >>"$logfile" 2>&1
  rc=$?
  if [ "$rc" = 0 ]; then status=passed
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed-out"
  else status=failed; fi
  record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$lim" "${NOTE:-}"
  NOTE=""
  return "$rc"
}
export -f say
export START LOG OUT WORK REPO PY DRY

# --- environment ------------------------------------------------------------------------------
say "gpu_session.sh: repo $REPO, out $OUT, python $PY, dry run $DRY, budget $BUDGET s"
{
  echo "date: $(date -u +%FT%TZ)"; echo "host cores: $(nproc)"; uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
} >>"$LOG" 2>&1
HAS_CUDA=$(cd "$WORK" && "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$LOG")
[ "$HAS_CUDA" = 1 ] || HAS_CUDA=0
say "CUDA available: $HAS_CUDA"

# --- stage 1: build --------------------------------------------------------------------------
BUILD_DIR="$WORK/build"
export BUILD_DIR HAS_CUDA
stage_build() {
  set -e
  mkdir -p "$BUILD_DIR"
  cd "$REPO"
  # a copy of the sources (the checkout itself stays untouched; stale .so files stay behind)
  for f in *.py pyproject.toml README.md MANIFEST.in csrc samkernels tests bench; do
    if [ -e "$f" ]; then cp -a "$f" "$BUILD_DIR/"; fi
  done
  find "$BUILD_DIR" -name '*.so' -delete
  find "$BUILD_DIR" -name __pycache__ -prune -exec rm -rf {} +
  cd "$BUILD_DIR"
  export MAX_JOBS=$(nproc)
  if [ "$HAS_CUDA" = 1 ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST SAMKERNELS_CUDA=1
    [ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  fi
  if ! "$PY" -c "import setuptools" 2>/dev/null; then
    echo "build: setuptools is not importable by $PY: cannot build (no network to install it)"
    exit 3
  fi
  ninja=no; command -v ninja >/dev/null && ninja=yes
  echo "build: $PY setup.py build_ext --inplace in $BUILD_DIR (no pip, no network); MAX_JOBS=$MAX_JOBS" \
       "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-none} SAMKERNELS_CUDA=${SAMKERNELS_CUDA:-auto}" \
       "CUDA_HOME=${CUDA_HOME:-unset} ninja=$ninja"
  "$PY" setup.py build_ext --inplace
  cd "$WORK"
  PYTHONPATH="$BUILD_DIR" "$PY" -c "import samkernels, samkernels._dispatch as d; \
print('built:', samkernels.__file__, 'extension', d.extension() is not None, 'cuda kernels', d.cuda_kernels_built())"
}
export -f stage_build
SAMK_FROM="the importable samkernels"
TESTROOT="$REPO"
if [ "$BUILD" = yes ] || { [ "$BUILD" = auto ] && [ "$HAS_CUDA" = 1 ]; }; then
  if run_stage build "${L_BUILD[@]}" "$LOG" stage_build; then
    export PYTHONPATH="$BUILD_DIR${PYTHONPATH:+:$PYTHONPATH}"
    TESTROOT="$BUILD_DIR"
    SAMK_FROM="the build in $BUILD_DIR"
    unset SAMKERNELS_TEST_INSTALLED  # the tests run against this build, not an installed wheel
  fi
else
  why="no CUDA device"; [ "$BUILD" = no ] && why="--no-build"
  record build "skipped-no-build" "-" 0 0 "$why: using the importable samkernels"
fi
if ! (cd "$WORK" && "$PY" -c "import samkernels" >/dev/null 2>&1); then
  say "no importable samkernels: using the checkout's Python sources (no compiled extension)"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  SAMK_FROM="the checkout's sources (not built)"
fi
(cd "$WORK" && "$PY" -c "import samkernels, samkernels._dispatch as d; \
print('samkernels', samkernels.__file__, '| extension', d.extension() is not None, '| cuda kernels', d.cuda_kernels_built())") >>"$LOG" 2>&1
export TESTROOT

# --- stage 2: GPU tests ----------------------------------------------------------------------
stage_tests() {
  cd "$TESTROOT/tests"
  files="test_gpu_ops.py"
  if [ "$HAS_CUDA" = 1 ] && [ -f test_norm_contract.py ]; then files="$files test_norm_contract.py"; fi
  # the op contract (device_step, skip forms, hard inputs) on the cuda backend too
  if [ "$HAS_CUDA" = 1 ] && [ -f test_contract.py ]; then files="$files test_contract.py"; fi
  extra=""
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then extra="--timeout=150"; fi
  # on a GPU: a worker per core but two (Triton compilations and float64 references are
  # CPU-bound); loadgroup keeps the tests that need most of the GPU's memory on one worker
  if [ "$HAS_CUDA" = 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
    extra="$extra -n ${SAMKERNELS_TEST_WORKERS:-$workers} --dist loadgroup"
  fi
  echo "tests: cd $PWD && $PY -m pytest $files (TRITON_INTERPRET=$TRITON_INTERPRET)"
  # -v: a stage cut at its time limit still shows in the log which tests ran
  "$PY" -m pytest -v -rfEs --durations=20 -p no:cacheprovider $files --junitxml="$OUT/junit.xml" $extra
}
export -f stage_tests
: >"$OUT/gpu_tests.log"
STAGE_SIGNAL=INT run_stage tests "${L_TESTS[@]}" "$OUT/gpu_tests.log" stage_tests
# collected / skipped from junit.xml: a run in which every test skipped is no pass
read -r N_TESTS N_SKIPPED < <("$PY" - "$OUT/junit.xml" <<'EOF' 2>/dev/null || echo "0 0"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
print(sum(int(s.get("tests", 0)) for s in suites), sum(int(s.get("skipped", 0)) for s in suites))
EOF
)
if [ "$HAS_CUDA" = 0 ]; then
  ST_STATUS[tests]="skipped-no-GPU"
  ST_NOTE[tests]="no CUDA device: the GPU tests were collected and skipped (pytest rc ${ST_RC[tests]})"
  say "stage tests: reported as skipped-no-GPU"
elif [ "${ST_STATUS[tests]}" = passed ] && [ "${N_TESTS:-0}" = "${N_SKIPPED:-0}" ]; then
  ST_STATUS[tests]="skipped-all"
  ST_NOTE[tests]="all ${N_TESTS:-0} tests skipped (no CUDA kernels in the samkernels used?): see gpu_tests.log"
  say "stage tests: every test skipped"
fi

# --- stage 3: tune ---------------------------------------------------------------------------
stage_tune() {
  cd "$WORK"
  "$PY" - <<'EOF'
import json
import samkernels
from samkernels import _dispatch
tune = getattr(samkernels, "tune_backend", None) or getattr(_dispatch, "tune_backend", None)
if tune is None:
    print(json.dumps({"error": "samkernels has no tune_backend yet"}))
    raise SystemExit(4)
res = tune()
print("TUNE " + json.dumps(res))
with open("tune.json", "w") as f:
    json.dump(res, f)
EOF
}
export -f stage_tune
if [ "$HAS_CUDA" = 1 ]; then
  run_stage tune "${L_TUNE[@]}" "$LOG" stage_tune
else
  record tune "skipped-no-GPU" "-" 0 0 "tune_backend measures CUDA kernels"
fi

# --- stages 4 and 5: step benchmarks, BiSAM loss benchmark -----------------------------------
stage_bench() {  # bench script, output stem
  cd "$WORK"
  args=""; [ "$DRY" = 1 ] && args="--dry-run"
  "$PY" "$TESTROOT/bench/$1" $args --md "$OUT/$2.md" --json "$OUT/$2.json"
}
stage_steps() { stage_bench report.py steps; }
stage_loss() { stage_bench bench_bisam_loss.py loss; }
export -f stage_bench stage_steps stage_loss
run_stage steps "${L_STEPS[@]}" "$LOG" stage_steps
run_stage loss "${L_LOSS[@]}" "$LOG" stage_loss

# --- summary ---------------------------------------------------------------------------------
{
  for s in "${STAGES[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "${ST_STATUS[$s]}" "${ST_RC[$s]}" "${ST_SECS[$s]}" \
      "${ST_LIMIT[$s]}" "${ST_NOTE[$s]}"
  done
} >"$WORK/stages.tsv"
TOTAL=$(( $(date +%s) - START ))
(cd "$WORK" && timeout -k 5 60 "$PY" - "$WORK/stages.tsv" "$OUT" "$WORK/tune.json" "$DRY" \
  "$TOTAL" "$SAMK_FROM" "$BUDGET" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
tsv, out, tune_path, dry, total, samk_from, budget = sys.argv[1:8]
stages = []
for line in open(tsv):
    name, status, rc, secs, limit, note = line.rstrip("\n").split("\t")
    stages.append(dict(stage=name, status=status, rc=rc, seconds=int(secs), limit=int(limit),
                       note=note))

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

info = {"dry_run": dry == "1", "total_seconds": int(total), "budget_seconds": int(budget),
        "samkernels_from": samk_from}
try:
    import torch
    info["torch"] = torch.__version__
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import samkernels
    from samkernels import _dispatch
    info["samkernels"] = os.path.dirname(samkernels.__file__)
    info["cuda_kernels_built"] = _dispatch.cuda_kernels_built()
except Exception as exc:  # the summary must still be written
    info["import_error"] = repr(exc)
try:
    root = ET.parse(os.path.join(out, "junit.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    info["tests"] = {k: sum(int(s.get(k, 0)) for s in suites)
                     for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError):
    info["tests"] = None
info["tune"] = load(tune_path)
targets = []
for name in ("steps", "loss"):
    data = load(os.path.join(out, f"{name}.json"))
    info[f"{name}_tables"] = "missing" if data is None else (
        "complete" if data.get("complete", True) else "PARTIAL (the stage was cut short)")
    for t in (data or {}).get("targets", []):
        targets.append(dict(t, bench=name))
lines = ["# GPU session summary", "",
         f"device: {info.get('device')}; torch {info.get('torch')}; samkernels from {samk_from} "
         f"({info.get('samkernels')}; CUDA kernels built: {info.get('cuda_kernels_built')}); "
         f"{'CPU DRY RUN; ' if dry == '1' else ''}total {total} s of a {budget} s budget", "",
         "| stage | status | rc | seconds | limit s | note |", "|---|---|---:|---:|---:|---|"]
lines += [f"| {s['stage']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['limit']} | "
          f"{s['note']} |" for s in stages]
if info["tests"]:
    t = info["tests"]
    lines += ["", f"tests: {t['tests']} collected, {t['failures']} failed, {t['errors']} errors, "
                  f"{t['skipped']} skipped (junit.xml, gpu_tests.log)"]
lines += ["", f"steps.md/json: {info['steps_tables']}; loss.md/json: {info['loss_tables']}"]
if info["tune"]:
    lines += ["", "tune_backend: `" + json.dumps(info["tune"]) + "`"]
if targets:
    met = sum(1 for t in targets if t.get("met"))
    lines += ["", f"targets met: {met} of {len(targets)} (details in steps.md, loss.md)"]
    lines += [f"- NOT MET: {t['what']}: {t['measured'] if t['measured'] is None else round(t['measured'], 3)}"
              f" (target {t['target']})" for t in targets if t.get("met") is False][:40]
lines += ["", "```json", json.dumps(dict(info, stages=stages,
                                          targets_met=sum(1 for t in targets if t.get("met")),
                                          targets_total=len(targets)), indent=1), "```", ""]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines))
EOF
) >>"$LOG" 2>&1 || say "summary: the python summary failed (see above)"
[ -s "$OUT/summary.md" ] || {
  echo "# GPU session summary (fallback: python failed)"; echo
  echo "| stage | status | rc | seconds | limit s | note |"; echo "|---|---|---:|---:|---:|---|"
  sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$WORK/stages.tsv"
} >"$OUT/summary.md"
rm -rf "$WORK"
say "done in $TOTAL s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
cat "$OUT/summary.md"
# the session's own exit status: 0 when every stage that ran passed (skips are not failures)
for s in "${STAGES[@]}"; do
  case "${ST_STATUS[$s]}" in passed|skipped-no-*) ;; *) exit 1 ;; esac
done
exit 0
