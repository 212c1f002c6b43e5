"""Every fused phase against an independent oracle (tests/oracles.py), on every backend.

The contract test compares each backend with the float64 reference; a bug in the reference itself,
copied into every kernel, passes it.  Here the expected values come from the paper (the worked bSAM
example of docs/spec.md), from torch.optim, or from a float64 formula written in tests/oracles.py
with its own Philox, so such a bug fails on every backend, the reference included.
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import samkernels  # noqa: E402
from samkernels import _dispatch  # noqa: E402
from samkernels.ops._spec import PHASES, STEP_TENSORS  # noqa: E402

import oracles  # noqa: E402
from conftest import has_extension  # noqa: E402


def _triton_runs() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


# (backend, device): every backend on its device; Triton on CPU tensors via the interpreter
BACKENDS = [pytest.param(("reference", "cpu"), id="reference"),
            pytest.param(("cpu", "cpu"), id="cpu",
                         marks=pytest.mark.skipif(not has_extension(), reason="no samkernels._C")),
            pytest.param(("triton", "cuda" if torch.cuda.is_available() else "cpu"), id="triton",
                         marks=pytest.mark.skipif(not _triton_runs(), reason="no Triton")),
            pytest.param(("cuda", "cuda"), id="cuda",
                         marks=pytest.mark.skipif(not _dispatch.cuda_kernels_built()
                                                  or not torch.cuda.is_available(),
                                                  reason="needs CUDA"))]
CASE_IDS = [(op, path) for op, paths in oracles.PATHS.items() for path in paths]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-13), torch.float32: dict(rtol=2e-6, atol=2e-7)}


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
        return [t.to(device) for t in x]
    return x


def run_case(op, path, dtype, backend, device):
    """Build the case, run the backend's op on it, compare what it wrote with the oracle."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{op}/{path}".encode()))
    case = oracles.BUILDERS[op](dtype, path, gen)
    args = {n: _to(v, device) for n, v in case.args.items()}
    impl = _dispatch.implementation(op, torch.device(device), backend)
    ret = impl(*[args.get(n) for n in PHASES[op].arg_names])  # device_step: None
    for name, want in case.expect.items():
        if name == "return":
            want_dtype = torch.float32 if PHASES[op].result == "flag" else torch.float64
            assert ret is not None and ret.dtype == want_dtype, f"{op}: returns {ret!r}"
            rel = 1e-12 if dtype == torch.float64 else 1e-6
            if isinstance(want, list):  # samv_dots: three sums
                assert ret.cpu().tolist() == pytest.approx(want, rel=rel)
            else:
                assert ret.item() == pytest.approx(want, rel=rel)
            continue
        got = args[name]
        tol = TOL[dtype] if dtype == torch.float64 else case.tol.get(name, case.tol.get(
            "*", TOL[dtype]))
        assert len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want)):
            scale = max(1.0, w.abs().max().item())  # absolute error grows with the magnitude
            torch.testing.assert_close(g.double().cpu(), w, rtol=tol["rtol"],
                                       atol=tol["atol"] * scale,
                                       msg=lambda m: f"{op}[{path}] {name}[{i}] {dtype}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("op,path", CASE_IDS, ids=[f"{o}-{p}" for o, p in CASE_IDS])
@pytest.mark.parametrize("where", BACKENDS)
def test_op_matches_oracle(op, path, dtype, where):
    run_case(op, path, dtype, *where)


def test_every_phase_has_an_oracle_on_every_path():
    """No op of the table without an oracle; the paths cover each found_inf value, both bSAM
    line-5 placements, every list an op writes and the norm it returns."""
    assert set(oracles.PATHS) == set(PHASES), set(PHASES) ^ set(oracles.PATHS)
    gen = torch.Generator().manual_seed(0)
    for op, paths in oracles.PATHS.items():
        spec = PHASES[op]
        seen = set()
        for path in paths:
            for dtype in (torch.float32, torch.float64):
                case = oracles.BUILDERS[op](dtype, path, gen)
                # device_step: equal to the host step bit for bit (test_contract.py)
                assert set(case.args) == set(spec.arg_names) - set(STEP_TENSORS), (op, path)
                seen |= set(case.expect)
        assert set(spec.written) <= seen, (op, set(spec.written) - seen)
        if spec.result in ("norm", "dots", "flag"):
            assert "return" in seen, op
        if spec.takes_found_inf:
            flags = {("skip" if p.endswith("skip") else "finite" if p.endswith("finite") else
                      "none") for p in paths}
            assert flags == {"none", "finite", "skip"}, (op, flags)
        if "accums" in spec.arg_names:
            assert any("deferred" in p for p in paths) and any(
                "deferred" not in p and "released" not in p for p in paths), op


# --- Philox ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ctr,key,out", oracles.KAT)
def test_plain_philox_matches_random123_known_answers(ctr, key, out):
    assert oracles.philox4x32_10(ctr, key) == out


def test_golden_noise_values():
    """The documented transform, pinned: a change of the noise contract must be deliberate."""
    z = oracles.normals(oracles.SEED, 2 ** 33 + 7, 5, 5)
    u = oracles.uniforms(oracles.SEED, 2 ** 32 - 1, 2 ** 31 + 3, 3)
    w0 = oracles.philox4x32_10((0, 5, 0, 0), (0x9ABCDEF, 0x1234567))
    assert [f"{x:08x}" for x in w0] == GOLDEN_WORDS
    torch.testing.assert_close(z, torch.tensor(GOLDEN_Z, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(u, torch.tensor(GOLDEN_U, dtype=torch.float64), rtol=0, atol=0)


# Philox words of block 0 of parameter 5 at step 0, seed oracles.SEED; the normals of elements
# 0..4 at step 2^33 + 7 (block 1 starts at element 4); the uniforms at step 2^32 - 1
GOLDEN_WORDS = ["0f0b72fa", "37cd15fb", "73c633d6", "d9c9d7db"]
GOLDEN_Z = [-0.42866488068589226, 0.2902691088916159, -0.7743868221842096, -0.5333042480526601,
            -0.32599551767328294]
GOLDEN_U = [0.1553773283958435, 0.7687464356422424, 0.8821378350257874]


# --- optimizer-level oracles -----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not has_extension(), reason="no samkernels._C"))])
@pytest.mark.parametrize("name", ["MFVI", "VariationalSAM"])
def test_posterior_sample_has_std_sqrt_sigma(name, backend):
    """sampled_params draws theta = mu + sqrt(Sigma) z: with Sigma = 4 the spread is 2, not 4."""
    cls = getattr(samkernels.optim, name)
    w = torch.nn.Parameter(torch.zeros(40_000, dtype=torch.float64))
    opt = cls([w], lr=0.1, num_data=10)
    opt.state[w]["variance"] = torch.full_like(w, 4.0)
    with samkernels.use_backend(backend), opt.sampled_params(7):
        spread = w.detach().std().item()
    assert spread == pytest.approx(2.0, rel=0.02)
    assert torch.equal(w.detach(), torch.zeros_like(w))
