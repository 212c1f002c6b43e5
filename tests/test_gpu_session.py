"""The one-call GPU session, run here as its CPU dry run: ``bash bench/gpu_session.sh --cpu-dry-run``.

The same script a GPU lease runs (build, GPU tests, tuning, step and loss benchmarks), with toy
sizes, the Triton interpreter and no CUDA: every stage must run, write its files (at most the 8 a
lease brings back) and report honestly: the GPU tests are skipped here, and the summary must say
so rather than count them as passed.  Uses the samkernels this interpreter imports (CI: the
installed wheel) and finds the script from this file's checkout.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import sys
import xml.etree.ElementTree as ET

import pytest

import samkernels

import conftest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"
FILES = {"session.log", "gpu_tests.log", "junit.xml", "steps.md", "steps.json", "loss.md",
         "loss.json", "summary.md"}
STAGES = ["build", "tests", "tune", "steps", "loss"]
DRY_SETS = ["resnet50-dry", "gpt2-dry", "tiny-24"]  # bench/cases.py DRY_SETS
HAVE_TRITON = importlib.util.find_spec("triton") is not None  # else its rows say why not
STEP_IMPLS = ["fused-cpu:skip_on_device", "fused-triton:skip_on_device", "foreach", "loop",
              "fused-cpu:unchecked"]
LOSS_IMPLS = ["fused-cpu"] + (["fused-triton"] if HAVE_TRITON else []) + ["cross_entropy", "naive"]


class _DryRun(conftest.ProcessJob):
    """The dry run, started when collection selects a test of this module
    (conftest.background_job): it runs while the other tests do (not niced: its stages have
    time limits)."""

    def __init__(self, workdir):
        self.out = workdir / "out"
        self.out.mkdir()
        self.start(["bash", str(SCRIPT), "--cpu-dry-run", str(self.out)], workdir,
                   env=dict(os.environ, PYTHON=sys.executable), cwd=self.out,
                   preexec_fn=conftest.orphan_safe)


conftest.background_job("gpu_session")(_DryRun)


@pytest.fixture(scope="module")
def session():
    handle = conftest.job("gpu_session")
    return handle.finish(timeout=420), handle.out


def _summary_json(out: pathlib.Path) -> dict:
    text = (out / "summary.md").read_text()
    m = re.search(r"```json\n(.*?)\n```", text, re.S)
    assert m, f"summary.md has no json block:\n{text}"
    return json.loads(m.group(1))


def test_runs_and_writes_the_files_a_lease_returns(session):
    proc, out = session
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    names = {p.name for p in out.iterdir()}
    assert names == FILES, f"expected exactly {sorted(FILES)}, got {sorted(names)}"
    for p in out.iterdir():
        assert p.is_file() and 0 < p.stat().st_size <= 16 * 2 ** 20, p
    assert "# GPU session summary" in proc.stdout  # the summary is printed last


def test_summary_reports_each_stage_and_no_gpu_as_skipped(session):
    _, out = session
    info = _summary_json(out)
    stages = {s["stage"]: s for s in info["stages"]}
    assert list(stages) == STAGES
    assert info["dry_run"] is True and info["device"] == "cpu"
    assert info["steps_tables"] == "complete" and info["loss_tables"] == "complete"
    assert stages["tests"]["status"] == "skipped-no-GPU"  # not "passed": nothing ran
    assert stages["tune"]["status"] == "skipped-no-GPU"
    assert stages["build"]["status"].startswith("skipped")
    assert stages["steps"]["status"] == "passed" and stages["steps"]["rc"] == "0"
    assert stages["loss"]["status"] == "passed" and stages["loss"]["rc"] == "0"
    assert info["total_seconds"] <= info["budget_seconds"]
    # the session measured the samkernels this interpreter imports (CI: the installed wheel)
    assert info["samkernels"] == os.path.dirname(samkernels.__file__)
    table = (out / "summary.md").read_text()
    for name in STAGES:
        assert re.search(rf"^\| {name} \| \S+ \|", table, re.M), name


def test_gpu_tests_were_collected_and_skipped(session):
    _, out = session
    root = ET.parse(out / "junit.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    assert total > 100 and skipped == total and failed == 0
    assert "test_gpu_ops.py" in (out / "gpu_tests.log").read_text()
    assert _summary_json(out)["tests"] == {"tests": total, "failures": 0, "errors": 0,
                                           "skipped": total}


def test_step_tables_have_every_implementation(session):
    _, out = session
    data = json.loads((out / "steps.json").read_text())
    assert data["dry_run"] is True and data["complete"] and data["copy_bandwidth_GBps"] > 0
    rows = {(r["algo"], r["shapes"], r["impl"]): r for r in data["rows"]}
    md = (out / "steps.md").read_text()
    for algo in ("sam", "bsam"):
        for shapes in DRY_SETS:
            for impl in STEP_IMPLS:
                r = rows[(algo, shapes, impl)]
                if "triton" in impl and not HAVE_TRITON:
                    assert "triton" in r["error"], r
                    continue
                assert r["error"] is None, r
                assert r["median_ms"] > 0 and r["x_floor"] > 0
                assert re.search(rf"^\| {algo} \| {shapes} \(\d+ tensors, [0-9.]+M\) \| "
                                 rf"{re.escape(impl)} \| [0-9.]+ \|", md, re.M), (algo, shapes, impl)
            for impl in STEP_IMPLS[:2 if HAVE_TRITON else 1]:  # fused: a row per phase
                phases = [p for p in data["phases"]
                          if (p["algo"], p["shapes"], p["impl"]) == (algo, shapes, impl)]
                assert len(phases) == (3 if algo == "bsam" else 2), (algo, shapes, impl)
    # measured against the GPU targets (toy sizes here: values, not verdicts)
    whats = [t["what"] for t in data["targets"]]
    assert any("gpt2-dry" in w and "x floor" in w for w in whats)
    assert any("tiny-24" in w and "vs foreach" in w for w in whats)
    assert "Targets" in md and "| what | measured | target | met |" in md


def test_loss_tables_have_every_implementation(session):
    _, out = session
    data = json.loads((out / "loss.json").read_text())
    assert data["dry_run"] is True and data["complete"] and not data["unavailable"]
    got = {(r["B"], r["K"], r["impl"]) for r in data["rows"]}
    md = (out / "loss.md").read_text()
    for B, K in ((4, 10), (3, 300)):
        for impl in LOSS_IMPLS:
            assert (B, K, impl) in got
            assert re.search(rf"^\| {B}×{K} \| float32 \| {impl} \| [0-9.]+ \|", md, re.M)
    assert all(r["median_ms"] > 0 and r["GBps"] > 0 for r in data["rows"])
    assert {t["what"].split()[0] for t in data["targets"]} == {i for i in LOSS_IMPLS
                                                               if i.startswith("fused-")}
