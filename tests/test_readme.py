"""The README's ```python blocks, run top to bottom as one script.

Each block may use what the blocks before it defined, as a reader running the README would. The
script runs in a fresh process with a fresh working directory (checkpoints, logs and the Hugging Face
``out/`` land there) against the installed samkernels. A failure names the block and its first line.
"""
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import pytest

import conftest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text):
    """The ```python blocks of ``text``, in order, each as (first line number, source)."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def build_script(blocks):
    """One script: each block preceded by a marker that tells the parent which block is running.
    Returns the script and, per block, the script line its first line lands on."""
    parts, starts, n = ["import sys as _readme_sys\n"], [], 1  # n: lines written so far
    for i, (line, src) in enumerate(blocks, 1):
        parts.append(f"print('@@readme-block {i}', flush=True); "
                     f"_readme_sys.stderr.write('@@readme-block {i}\\n'); _readme_sys.stderr.flush()\n")
        n += 1
        starts.append(n + 1)          # the block's first line
        if not src.endswith("\n"):
            src += "\n"
        parts.append(src)
        n += src.count("\n")
    parts.append("print('@@readme-done', flush=True)\n")
    return "".join(parts), starts


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 12, len(blocks)
    for line, src in blocks:  # each block parses on its own (a syntax error names its line)
        compile(src, f"README.md block at line {line}", "exec")


class _Walkthrough(conftest.ProcessJob):
    """The README's python blocks as one script in a fresh interpreter, started when collection
    selects this module's tests (conftest.background_job): it runs while the other tests do."""

    def __init__(self, workdir):
        self.skip = None
        missing = [m for m in ("lightning", "transformers", "accelerate")
                   if importlib.util.find_spec(m) is None]
        if missing and os.environ.get("SAMKERNELS_TEST_INSTALLED") != "1":  # CI installs all 3
            self.skip = f"the README's Integrations blocks need {', '.join(missing)}"
            return
        self.blocks = python_blocks(README.read_text(encoding="utf-8"))
        script = workdir / "readme_walkthrough.py"
        text, self.starts = build_script(self.blocks)
        script.write_text(text, encoding="utf-8")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)          # the installed samkernels, not the checkout
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   WANDB_DISABLED="true", PYTHONDONTWRITEBYTECODE="1")
        env.pop("TRITON_INTERPRET", None)    # the README's backend choice, not the test suite's
        self.t0 = time.perf_counter()
        self.start([sys.executable, str(script)], workdir, cwd=workdir, env=env,
                   preexec_fn=conftest.orphan_safe)

    def wait(self):
        """A CompletedProcess, and the seconds since the start."""
        return self.finish(timeout=600), time.perf_counter() - self.t0


conftest.background_job("readme")(_Walkthrough)


def test_readme_python_blocks_run_top_to_bottom():
    walk = conftest.job("readme")
    if walk.skip:
        pytest.skip(walk.skip)
    blocks, starts = walk.blocks, walk.starts
    proc, elapsed = walk.wait()
    ran = [int(s) for s in re.findall(r"^@@readme-block (\d+)$", proc.stdout, re.M)]
    if proc.returncode != 0 or "@@readme-done" not in proc.stdout:
        i = ran[-1] if ran else 0
        line, src = blocks[i - 1] if i else (0, "")
        first = src.strip().splitlines()[0] if src.strip() else ""
        where, at = re.findall(r'readme_walkthrough\.py", line (\d+)', proc.stderr), ""
        if where and i:  # the innermost frame in the script, as a README.md line
            at = f", error at README.md line {line + int(where[-1]) - starts[i - 1]}"
        pytest.fail(f"README python block {i} of {len(blocks)} (README.md line {line}: {first!r}){at} "
                    f"failed (exit {proc.returncode}, {elapsed:.0f} s):\n{proc.stderr[-6000:]}")
    assert ran == list(range(1, len(blocks) + 1))
    print(f"README walkthrough: {len(blocks)} blocks in {elapsed:.1f} s")


def _github_anchor(heading):
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_into_docs_resolve():
    """Every README link to a file in the repository exists; every #anchor into docs/*.md names a
    heading of that file."""
    root = README.parent
    for target, anchor in re.findall(r"\]\(((?:docs|tests|bench)/[^)#\s]+)(?:#([^)\s]+))?\)",
                                     README.read_text(encoding="utf-8")):
        path = root / target
        assert path.exists(), f"README links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
            assert anchor in {_github_anchor(h) for h in headings}, f"{target}#{anchor}: no such heading"
