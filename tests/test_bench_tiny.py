"""bench/bench_tiny.py, the host-time benchmark, at toy size: one fresh process per optimizer
(the default), each printing its row of fused / foreach / loop times and ratios."""
import os
import re
import subprocess
import sys

import samkernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the samkernels this process imports (CI: the installed wheel, whose extension is built)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(samkernels.__file__)))


def test_rows_from_one_process_per_optimizer():
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_tiny.py"),
                          "--tensors", "40", "--rounds", "1", "--steps", "1",
                          "--algos", "sam"], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300).stdout
    assert "a fresh process per optimizer" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| optimizer |") and len(rows) == 2, out
    num = r"(\d+\.\d\d)"
    m = re.fullmatch(rf"\| sam \| {num} \| {num} \| {num} \| {num} \| {num} \|", rows[1])
    assert m, rows[1]
    assert all(float(x) > 0 for x in m.groups()), rows[1]
