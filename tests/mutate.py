"""Mutation check of the test suite: do the tests see a plausible bug?  Not run in CI.

Each mutation is one plausible bug: a list of edits (file, exact old text, new text), applied
together, and the tests that should catch it.  For each mutation this script, in a scratch copy of
the repository (``git archive`` of a commit, default HEAD, under /tmp, plus the built extension
``samkernels/_C*.so`` of this checkout):

  1. applies the edits; a snippet that is not in its file exactly once (the code moved on) makes
     the mutation "does not apply", never "survived";
  2. rebuilds the C++ extension there, only when a ``csrc/`` file changed (setup.py build_ext
     --inplace, CPU only; the first build in the copy takes minutes, later ones recompile the
     changed files);
  3. runs its tests against the copy (PYTHONPATH=<copy>, TRITON_INTERPRET=1, pytest -x);
  4. restores the files.

A mutation is "caught" when pytest fails, "SURVIVED" when it passes.  The tests are run on the
unmutated copy first: if they fail there, the run stops (a broken suite catches everything).

    python tests/mutate.py                 # every mutation, Python-only ones first
    python tests/mutate.py --python-only   # skip those that need a C++ rebuild
    python tests/mutate.py -k beta2 -k ece # names containing any of these
    python tests/mutate.py --list
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

Paths = Union[str, Tuple[str, ...]]  # a file, or candidates: the first that holds the snippet


@dataclass
class Mutation:
    name: str
    edits: Sequence[Tuple[Paths, str, str]]
    tests: Sequence[str]  # test files or node ids, relative to tests/
    k: str = ""           # pytest -k expression over them

    @property
    def cpp(self) -> bool:
        return any(p.startswith("csrc/") for paths, _, _ in self.edits
                   for p in ((paths,) if isinstance(paths, str) else paths))


REF = REF_VI = "samkernels/ops/reference.py"  # the whole spec (SAM, bSAM, the MFVI family)
TRI = "samkernels/triton/"
TRI_SAM, TRI_BSAM, TRI_VI = (TRI + f"{n}.py" for n in ("sam", "bsam", "vi"))
TRI_PHILOX = TRI + "_philox.py"
# the per-element maths the CPU kernels and the CUDA functors share (only the CPU build runs here)
CPU_SAM, CPU_BSAM, CPU_VI = "csrc/math/sam.h", "csrc/math/bsam.h", "csrc/math/vi.h"
# a family's torch-facing code: CPU kernels, the list roles, CUDA glue (only the CPU part builds here)
OPS_SAM, OPS_BSAM = "csrc/ops/sam.cpp", "csrc/ops/bsam.cpp"
ORACLE, WORKED = "test_oracles.py", "test_optim.py::test_bsam_worked_example"
OPS_INIT = "samkernels/ops/__init__.py"  # the public wrappers (the split of FSDP2 noise calls)
ASCENT = "test_train.py::test_first_pass_perturbation_ascends"


def oracle_bug(name: str, path: Paths, k: str, old: str, new: str) -> Mutation:
    """One edit, caught (or not) by the independent oracles of the ops matching ``k``."""
    return Mutation(name, [(path, old, new)], [ORACLE], k=k)


MUTATIONS: List[Mutation] = [
    # --- the six survivors of the first mutation run --------------------------------------------
    Mutation("bsam-line5-no-delta (spec + triton)", [
        (REF, "(1 - beta2) * (h + delta + gamma)", "(1 - beta2) * (h + gamma)"),
        (TRI_BSAM, "store(s, offs, beta2 * ss + omb2 * ((h + delta) + gamma)",
         "store(s, offs, beta2 * ss + omb2 * (h + gamma)")],
        [ORACLE, WORKED], k="bsam_perturb_ or worked_example"),
    Mutation("bsam-line5-no-delta (all backends)", [
        (REF, "(1 - beta2) * (h + delta + gamma)", "(1 - beta2) * (h + gamma)"),
        (TRI_BSAM, "store(s, offs, beta2 * ss + omb2 * ((h + delta) + gamma)",
         "store(s, offs, beta2 * ss + omb2 * (h + gamma)"),
        (CPU_BSAM, "static_cast<M>(delta + gamma)", "static_cast<M>(gamma)")],
        [ORACLE, WORKED], k="bsam_perturb_ or worked_example"),
    oracle_bug("adam 1-beta2 from fp32 beta2 (triton)", TRI_SAM, "sam_restore_adam_",
               "beta2, 1 - beta2, eps, weight_decay,",
               "beta2, 1 - torch.tensor(beta2, dtype=torch.float32).item(), eps, weight_decay,"),
    oracle_bug("adam 1-beta2 from fp32 beta2 (cpu)", CPU_SAM, "sam_restore_adam_",
               "static_cast<M>(1.0 - beta2)", "M(1) - static_cast<M>(beta2)"),
    Mutation("bsam 1-beta2 from fp32 beta2 (cpu)", [
        (CPU_BSAM, "static_cast<M>(1.0 - beta2)", "M(1) - static_cast<M>(beta2)")],
        [ORACLE], k="bsam_perturb_ or bsam_update_"),
    oracle_bug("philox drops the step's high word (cpu fp32 block)", "csrc/cpu/normal_block.h",
               "bsam_noise_ or vi_noise_ or mfvi_update_",
               "const uint32_t c3_ = static_cast<uint32_t>(step >> 32);",
               "const uint32_t c3_ = 0;"),
    Mutation("ece not weighted by bin counts", [
        ("samkernels/train/metrics.py", "sum(c / n * abs(a - f) for",
         "sum(abs(a - f) / sum(k > 0 for k in cal['count']) for")], ["test_metrics.py"]),
    Mutation("mfvi noise std = Sigma (spec + triton)", [
        (REF_VI, "std = variances[i].to(w.dtype).sqrt() if", "std = variances[i].to(w.dtype) if"),
        (TRI_VI, "std = sqrt(load(v, offs, n, MASKED).to(MATH))",
         "std = load(v, offs, n, MASKED).to(MATH)")],
        [ORACLE], k="vi_noise_ or std_sqrt_sigma"),
    oracle_bug("mfvi noise std = Sigma (cpu)", CPU_VI, "vi_noise_ or std_sqrt_sigma",
               "const M sd = learned ? sk_sqrt(var) : sigma;",
               "const M sd = learned ? var : sigma;"),
    Mutation("randomsam skip keeps the noise counter",  # (its rollback: the counter rewound)
             [("samkernels/optim/random_sam.py", 'self._rewind_counter("noise_step")\n', "pass\n")],
             ["test_hostile.py"], k="nonfinite"),
    # --- more single bugs ------------------------------------------------------------------------
    Mutation("philox drops the step's high word (spec)", [
        (REF, "full((step >> 32) & _MASK32)", "full(0)")], [ORACLE], k="bsam_noise_"),
    oracle_bug("philox drops the step's high word (triton)", TRI_PHILOX,
               "bsam_noise_ or ebisam_perturb_",
               "zero + step_hi.to(tl.uint32, bitcast=True))", "zero)"),
    Mutation("sam perturbation sign flipped (spec + triton)", [
        (REF, "p.copy_(w + e)", "p.copy_(w - e)")],
        [ORACLE, ASCENT], k="sam_perturb_ or ascends"),
    Mutation("sam perturbation sign flipped (cpu)", [
        (CPU_SAM, "return w + e * scale;", "return w - e * scale;")],
        [ORACLE, ASCENT], k="sam_perturb_ or ascends"),
    Mutation("asam drops eta (spec)", [
        (REF, "g.double() * (p.double().abs() + eta) if adaptive",
         "g.double() * p.double().abs() if adaptive")], [ORACLE], k="grad_sumsq"),
    oracle_bug("grad_sumsq accumulates in float32 (spec)", REF, "grad_sumsq",
               "if adaptive else g.double()\n", "if adaptive else g.float()\n"),
    oracle_bug("a tensor's first Philox block ignored (cpu)", "csrc/cpu/normal_block.h",
               "bsam_noise_ or vi_noise_", "first(static_cast<uint64_t>(param_id) >> 32)",
               "first(0)"),
    oracle_bug("a tensor's first Philox block ignored (triton)", "samkernels/triton/_philox.py",
               "bsam_noise_ or ebisam_perturb_", "first = (key >> 32).to(tl.uint32)",
               "first = (key * 0).to(tl.uint32)"),
    Mutation("a split call's odd entries on the fused backend too", [
        (OPS_INIT, "rest = [i for i in range(len(values[0])) if i not in odd_set]",
         "rest = list(range(len(values[0])))")], ["test_fsdp.py"], k="split_call"),
    Mutation("a split call gives the reference every entry", [
        (OPS_INIT, "done = _SPEC[name](*_entries(op, values, odd))",
         "done = _SPEC[name](*values)")], ["test_fsdp.py"], k="split_call"),
    oracle_bug("the check misses NaN (spec)", REF, "nonfinite_flag",
               "if not bool(torch.isfinite(g).all()):", "if bool(g.isinf().any()):"),
    oracle_bug("the check misses a chunk's tail (cpu)", "csrc/cpu/multi_tensor.h",
               "nonfinite_flag", "  for (int j = 0; i < v.end; ++i, ++j) {\n    const M y",
               "  for (int j = 0; i < v.end - 1; ++i, ++j) {\n    const M y"),
    oracle_bug("the check as a float32 sum of squares (triton)", "samkernels/triton/sam.py",
               "nonfinite_flag", "bad = (x != x) | (tl.abs(x) == float(\"inf\"))",
               "bad = (x.to(tl.float32) * x.to(tl.float32)) == float(\"inf\")"),
    oracle_bug("nesterov ignored (spec)", REF, "sam_restore_sgd_",
               "d = d.add(buf, alpha=momentum) if nesterov else buf", "d = buf"),
    oracle_bug("nesterov ignored (cpu)", CPU_SAM, "sam_restore_sgd_",
               "d = nesterov ? d + momentum * b : b;", "d = b;"),
    oracle_bug("adam bias correction off by one step (spec)", REF, "sam_restore_adam_",
               "1 - beta1 ** step,", "1 - beta1 ** (step + 1),"),
    oracle_bug("adam bias correction off by one step (cpu)", CPU_SAM, "sam_restore_adam_",
               "std::pow(beta1, static_cast<double>(step))",
               "std::pow(beta1, static_cast<double>(step + 1))"),
    Mutation("sam-adam counts steps twice (optimizer)", [
        ("samkernels/optim/sam.py", 'st["step"] += 1', 'st["step"] += 2')],
        ["test_ergonomics.py"], k="rho_zero"),
    Mutation("adamw weight decay missing (cpu)", [
        (CPU_SAM, "if (decoupled) w = w * decay;", "if (decoupled) w = w;")],
        [ORACLE], k="sam_restore_adam_"),
    oracle_bug("adamw weight decay missing (spec)", REF, "sam_restore_adam_",
               "w.mul_(1 - lr * weight_decay)", "w.mul_(1.0)"),
    oracle_bug("sgd skip does not restore (spec)", REF, "sam_restore_sgd_",
               "return copy_all_(params, backups)\n    for i, (p, g, b) in enumerate(",
               "return\n    for i, (p, g, b) in enumerate("),
    oracle_bug("bsam noise without N (spec)", REF, "bsam_noise_",
               "torch.sqrt(num_data * s.to(w.dtype))", "torch.sqrt(s.to(w.dtype))"),
    oracle_bug("bsam released order swapped (cpu)", CPU_BSAM, "bsam_update_",
               "(released_order ? s_old : s_new)", "(released_order ? s_new : s_old)"),
    Mutation("bsam optimizer passes beta1 as beta2", [
        ("samkernels/optim/bsam.py", 'group["betas"][1], group["weight_decay"], group["gamma"],',
         'group["betas"][0], group["weight_decay"], group["gamma"],')],
        [WORKED]),
    Mutation("mfvi variance step ascends (spec)", [
        (REF_VI, "v.copy_(var * torch.exp(-var_lr * du))\n        p.copy_(mu - lr * d)",
         "v.copy_(var * torch.exp(var_lr * du))\n        p.copy_(mu - lr * d)")],
        [ORACLE], k="mfvi_update_"),
    oracle_bug("ebisam mask inverted (spec)", REF_VI, "ebisam_perturb_",
               ".view(p.shape) < beta", ".view(p.shape) >= beta"),
    # the list roles of an op, stated once in its ops file for the CPU kernel and the CUDA glue
    Mutation("sam_perturb_ backups not marked written (ops lists)", [
        (OPS_SAM, '{"backups", backups, kP, W}};', '{"backups", backups, kP}};')],
        ["test_contract.py"], k="sam_perturb_ and cpu"),
    Mutation("bsam_perturb_ skip form drops the restore (cpu)", [
        (OPS_BSAM, "if (pl.skip()) return copy_lists(params, backups);\n  pl.run([&](const auto& v) {\n"
         "    SK_CHUNK_TYPES(v);\n    const auto maths = math::BsamPerturb",
         "if (pl.skip()) return;\n  pl.run([&](const auto& v) {\n"
         "    SK_CHUNK_TYPES(v);\n    const auto maths = math::BsamPerturb")],
        ["test_contract.py"], k="bsam_perturb_ and cpu"),
    oracle_bug("ivon mean step divides by the old h (spec)", REF, "ivon_update_",
               "/ (h_new + weight_decay),", "/ (hh + weight_decay),"),
    oracle_bug("ivon Hessian estimate without delta (triton)", TRI + "ivon.py", "ivon_update_",
               "f = nxg * hd * ess", "f = nxg * hh * ess"),
    oracle_bug("ivon running mean over count - 1 (cpu)", "csrc/math/ivon.h", "ivon",
               "return avg + (x - avg) / count;", "return avg + (x - avg) / (count - M(1));"),
    Mutation("ivon samples of a step share one noise draw (optimizer)", [
        ("samkernels/optim/ivon.py", 'step, at = self._counter_args("noise_step")\n',
         'step, at = self._counter_args("noise_step", -k)\n')],
        ["test_ivon.py"], k="50_steps and reference and fp64-2"),
]


def _sh(cmd, cwd, env=None, log=None) -> int:
    out = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    if log is not None:
        log.append(out.stdout)
    return out.returncode


def make_copy(rev: str) -> str:
    root = tempfile.mkdtemp(prefix="samkernels-mutate-")
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], check=True,
                             stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    for so in glob.glob(os.path.join(REPO, "samkernels", "_C*.so")):
        shutil.copy2(so, os.path.join(root, "samkernels"))
    return root


def apply(root: str, m: Mutation):
    """Apply the edits; returns {path: original text}, or a reason it does not apply."""
    originals, texts = {}, {}
    for paths, old, new in m.edits:
        cands = (paths,) if isinstance(paths, str) else paths
        hit = None
        for rel in cands:
            path = os.path.join(root, rel)
            if not os.path.exists(path):
                continue
            text = texts.get(rel) or open(path).read()
            if text.count(old) == 1:
                hit = rel
                texts[rel] = text.replace(old, new)
                originals.setdefault(rel, text)
                break
        if hit is None:
            return f"{old[:40]!r} is not once in {' / '.join(cands)}"
    for rel, text in texts.items():
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    return originals


def restore(root: str, originals) -> None:
    for rel, text in originals.items():
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)


def build(root: str, log) -> bool:
    env = dict(os.environ, SAMKERNELS_CUDA="0")
    return _sh([PY, "setup.py", "-q", "build_ext", "--inplace"], root, env, log) == 0


def run_tests(root: str, m: Mutation, log) -> int:
    env = dict(os.environ, PYTHONPATH=root, TRITON_INTERPRET="1")
    return _sh([PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests]
               + (["-k", m.k] if m.k else []),
               os.path.join(root, "tests"), env, log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", action="append", default=[], help="run mutations whose name has this")
    ap.add_argument("--python-only", action="store_true", help="skip mutations of csrc/")
    ap.add_argument("--rev", default="HEAD", help="commit to mutate (default HEAD)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = ap.parse_args(argv)
    todo = [m for m in MUTATIONS if not args.k or any(k in m.name for k in args.k)]
    todo = [m for m in todo if not (args.python_only and m.cpp)]
    # Python first (no rebuild); C++ grouped by file, so each rebuild recompiles one file
    todo.sort(key=lambda m: (m.cpp, m.cpp and str(m.edits[0][0])))
    if args.list:
        for m in todo:
            print(f"{'C++ ' if m.cpp else 'py  '} {m.name}: {' '.join(m.tests)} -k {m.k!r}")
        return 0
    root = make_copy(args.rev)
    print(f"scratch copy of {args.rev}: {root}", flush=True)
    rows, log = [], []
    try:
        for m in {(tuple(m.tests), m.k): m for m in todo}.values():
            if run_tests(root, m, log) != 0:
                print(log[-1][-3000:])
                print(f"{' '.join(m.tests)} -k {m.k!r} fails on the unmutated copy: fix that first")
                return 2
        built = False
        for m in todo:
            t0 = time.time()
            originals = apply(root, m)
            if isinstance(originals, str):
                rows.append((m, "does not apply", originals, 0.0))
                print(f"{m.name}: does not apply ({originals})", flush=True)
                continue
            try:
                if m.cpp or built:  # a reverted C++ edit needs the rebuild too
                    built = m.cpp or built
                    if not build(root, log):
                        rows.append((m, "caught", "build failed", time.time() - t0))
                        continue
                rc = run_tests(root, m, log)
            finally:
                restore(root, originals)
            verdict = "caught" if rc != 0 else "SURVIVED"
            why = "" if rc in (0, 1) else f"pytest rc {rc}"
            rows.append((m, verdict, why, time.time() - t0))
            print(f"{m.name}: {verdict} {why} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| mutation | kind | result | s |\n|---|---|---|---|")
    for m, verdict, why, secs in rows:
        print(f"| {m.name} | {'C++' if m.cpp else 'Python'} | {verdict}"
              f"{' (' + why + ')' if why else ''} | {secs:.0f} |")
    return 1 if any(v == "SURVIVED" for _, v, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
