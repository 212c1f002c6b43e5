"""FSDP2 (``fully_shard``), 2 processes on gloo over loopback: every optimizer built the plain way
on the sharded model's parameters takes the steps it takes on the unsharded model.

FSDP2 shards every parameter along dim 0 (uneven here: 7 rows give 4 + 3) and reduce-scatters
the gradients as the mean over the ranks.  Rank r trains on half r of the batch, so the mean of
the two halves' mean gradients is the full batch's: the reference is one process on the whole
batch (m = 1).  The ops run on the local shards; the norms, dot products and inf/NaN flags are
reduced over the shards' group.  All runs share one spawn (one process group)."""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from samkernels import _dispatch, ops
from samkernels import optim as sk
from samkernels import use_backend as sk_backend
from samkernels.ops import reference as R
from samkernels.ops._spec import PHASES

import conftest
from helpers import F64, op_args
from oracles import case
from test_distributed import WORLD, _Spawn, in_process_group

STEPS, BATCH = 3, 16
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _two_groups(ps):
    ps = list(ps)
    return [{"params": ps[0::2]}, {"params": ps[1::2], "lr": 0.05}]


MAKERS = {
    "sam": lambda ps: sk.SAM(ps, lr=0.1, rho=0.1, momentum=0.9, weight_decay=1e-3),
    "asam": lambda ps: sk.ASAM(ps, lr=0.1, rho=0.5, momentum=0.9),
    "sam-adam": lambda ps: sk.SAM(ps, lr=0.01, rho=0.05, base="adam", weight_decay=1e-3),
    "sam-adamw-groups": lambda ps: sk.SAM(_two_groups(ps), lr=0.01, rho=0.05, base="adamw",
                                          weight_decay=1e-2),
    "bisam": lambda ps: sk.BiSAM(ps, lr=0.1, rho=0.05, momentum=0.9),
    "abisam": lambda ps: sk.BiSAM(ps, lr=0.1, rho=0.5, adaptive=True, eta=0.01),
    "vsam": lambda ps: sk.VSAM(ps, lr=0.1, num_data=64, rho=0.05, momentum=0.9),
    "gsam": lambda ps: sk.GSAM(ps, lr=0.1, rho=0.1, alpha=0.3, momentum=0.9),
    "wsam": lambda ps: sk.WSAM(ps, lr=0.1, rho=0.1, gamma=0.8),
    "looksam": lambda ps: sk.LookSAM(ps, lr=0.1, rho=0.1, k=2),
    "friendlysam": lambda ps: sk.FriendlySAM(ps, lr=0.1, rho=0.1, sigma=1.0, lmbda=0.9),
}
# noise keyed by each element's index in the whole parameter: a shard draws the unsharded numbers
NOISY = {
    "bsam": lambda ps: sk.BSAM(ps, lr=0.1, num_data=64, rho=0.05, weight_decay=1e-3, seed=9),
    "randomsam": lambda ps: sk.RandomSAM(ps, lr=0.1, rho=0.05, momentum=0.9, seed=5),
    "mfvi": lambda ps: sk.MFVI(ps, lr=0.1, num_data=64, rho=0.05, seed=7),
    "ivon": lambda ps: sk.IVON(ps, lr=0.1, ess=64, seed=3),
    "ebisam": lambda ps: sk.EBiSAM(ps, lr=0.1, rho=0.05, beta=0.5, gamma=1.0, seed=4),
}
MAKERS.update(NOISY)
POSTERIORS = ("bsam", "mfvi", "ivon")  # sampled_params, predictive (and posterior_variance)

# (optimizer, how the step is driven, step whose gradient rank 1 poisons or -1)
CASES = {name: (name, "closure", -1) for name in MAKERS}
CASES.update({"sam-phases": ("sam", "phases", -1),
              "nan-sam": ("sam", "closure", 1),
              "nan-sam-device": ("sam", "device", 1),
              "nan-vsam": ("vsam", "closure", 1)})
CASES.update({"nan-bsam": ("bsam", "closure", 1)})
# a parameter with a gradient in the first pass and none in the second: restored from its backup
CASES.update({"dropgrad-sam": ("sam", "dropgrad", -1), "dropgrad-bsam": ("bsam", "dropgrad", -1)})
# the noisy optimizers on a model whose every shard starts at a whole Philox block (aligned), with
# the cpu backend named: a fall-back to the reference would raise
CASES.update({f"fused-{name}": (name, "fused", -1) for name in NOISY})
CHECKPOINTED = ("sam-adam", "vsam", "bsam", "mfvi")  # resumed through torch.distributed.checkpoint



def model_and_data(aligned=False):
    """Uneven shards, some starting inside a Philox block (Linear(7, 3)'s weight: rank 1 at
    element 14, its bias at 2), or (``aligned``) every shard at a multiple of 4 elements."""
    torch.manual_seed(0)
    hidden, out = (8, 8) if aligned else (7, 3)
    model = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.Tanh(),
                                torch.nn.Linear(hidden, out)).double()
    g = torch.Generator().manual_seed(1)
    return (model, torch.randn(BATCH, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (BATCH,), generator=g))


def sharded_model(aligned=False):
    from torch.distributed.fsdp import fully_shard
    model, x, y = model_and_data(aligned)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, x, y


def drive(opt, model, x, y, mode, steps, poison=lambda: None):
    """``steps`` steps of ``opt`` on (x, y); ``poison()`` may spoil a gradient after a backward."""
    def closure(ascent=False):
        opt.zero_grad()
        loss = (opt.ascent_loss(model(x), y) if ascent and isinstance(opt, sk.BiSAM)
                else F.cross_entropy(model(x), y))
        loss.backward()
        if mode == "dropgrad" and not ascent:
            model[2].bias.grad = None
        poison()
        return loss

    for _ in range(steps):
        if mode == "phases":
            closure(True)
            opt.first_step(zero_grad=True)
            closure(False)
            opt.second_step(zero_grad=True)
        else:
            opt.step(closure)


def _run_case(rank, name, mode, poison_step):
    if mode == "fused":
        with sk_backend("cpu"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = _run_case(rank, name, "aligned", poison_step)
        out["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
        return out
    model, x, y = sharded_model(mode == "aligned")
    mode = "closure" if mode == "aligned" else mode
    if mode == "device":
        opt = sk.SAM(model.parameters(), lr=0.1, rho=0.1, momentum=0.9, weight_decay=1e-3,
                     nonfinite="skip_on_device")
    else:
        opt = MAKERS[name](model.parameters())
    half = BATCH // WORLD
    xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    skipped = []

    def poison():
        if rank == 1 and len(skipped) == poison_step:
            model[0].weight.grad.to_local()[0, 0] = float("nan")  # one element of one shard

    for _ in range(STEPS):
        drive(opt, model, xs, ys, mode, 1, poison)
        skipped.append(bool(opt.step_skipped))
    out = {"params": [p.full_tensor() for p in model.parameters()], "skipped": skipped}
    if name in POSTERIORS and poison_step < 0:
        out.update(posterior(opt, model, x))
    return out


def posterior(opt, model, x):
    """A posterior draw's weights, the predictive on x (every rank: the whole x), the variances."""
    with opt.sampled_params(generator=11):
        drawn = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                 for p in model.parameters()]
    pred = opt.predictive(model, x, samples=2, generator=3)
    var = [v.full_tensor() if hasattr(v, "full_tensor") else v
           for v in getattr(opt, "posterior_variance", lambda: [])()]
    return {"drawn": drawn, "predictive": pred, "variance": var}


def _run_checkpointed(rank, name, out_dir):
    """STEPS steps, save (model and optimizer, torch.distributed.checkpoint), a fresh model and
    optimizer load it, STEPS more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_state_dict, set_state_dict)
    half = BATCH // WORLD
    where = os.path.join(out_dir, f"dcp-{name}")
    model, x, y = sharded_model()
    xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    opt = MAKERS[name](model.parameters())
    drive(opt, model, xs, ys, "closure", STEPS)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=where)
    drive(opt, model, xs, ys, "closure", STEPS)
    uninterrupted = [p.full_tensor() for p in model.parameters()]

    model, _, _ = sharded_model()  # the initial weights: the checkpoint must bring the trained ones
    opt = MAKERS[name](model.parameters())
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=where)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    drive(opt, model, xs, ys, "closure", STEPS)
    return {"resumed": [p.full_tensor() for p in model.parameters()],
            "uninterrupted": uninterrupted}


def _fused_refuses_shards(rank):
    """Noise on shards of which one starts inside a Philox block (rank 1's part of Linear(7, 3)):
    the automatic choice runs those entries on the reference (one warning) and the others fused;
    a fused backend asked for by name raises, on every rank (the layout decides, not the rank's
    own offsets)."""
    model, x, y = sharded_model()
    opt = NOISY["bsam"](model.parameters())
    before = [p.full_tensor() for p in model.parameters()]
    try:
        with sk_backend("cpu"):
            opt.noise_step()
        message = None
    except ValueError as exc:
        message = str(exc)
    restored = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    torch.manual_seed(100 + rank)  # the ranks' generators differ: a drawn seed is rank 0's
    drawn = sk.MFVI(model.parameters(), lr=0.1, num_data=64).state_dict()["samkernels"]["seed"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.noise_step()
    opt.restore()
    return {"message": message, "restored": restored, "drawn_seed": drawn,
            "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}


def _worker(rank, port, out_dir):
    def run():
        # first: the fallback warns once per op and process
        torch.save(_fused_refuses_shards(rank), os.path.join(out_dir, f"refused-rank{rank}.pt"))
        for case, args in CASES.items():
            torch.save(_run_case(rank, *args), os.path.join(out_dir, f"{case}-rank{rank}.pt"))
        for name in CHECKPOINTED:
            torch.save(_run_checkpointed(rank, name, out_dir),
                       os.path.join(out_dir, f"dcp-{name}-rank{rank}.pt"))
    in_process_group(rank, port, run)


def _spawn(workdir):
    """Every case on WORLD ranks, one spawn, started at collection (conftest.background_job)."""
    return _Spawn(workdir, _worker, list(CASES) + [f"dcp-{n}" for n in CHECKPOINTED] + ["refused"])


conftest.background_job("fsdp")(_spawn)


@pytest.fixture(scope="module")
def fsdp_runs():
    return conftest.job("fsdp").wait()


def unsharded(name, mode="closure", skip_step=None, with_posterior=False):
    """The reference: one process (default backend), the whole batch, ``skip_step`` left out."""
    model, x, y = model_and_data(mode == "fused")
    mode = "closure" if mode == "fused" else mode
    opt = MAKERS[name](model.parameters())
    for t in range(STEPS):
        if t != skip_step:
            drive(opt, model, x, y, mode, 1)
    params = [p.detach() for p in model.parameters()]
    return (params, posterior(opt, model, x)) if with_posterior else params


def _close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", [c for c, (_, _, poison) in CASES.items() if poison < 0])
def test_fsdp_equals_unsharded_full_batch(fsdp_runs, case):
    name, mode, _ = CASES[case]
    want = unsharded(name, mode)
    for r in fsdp_runs[case]:
        assert r["skipped"] == [False] * STEPS
        _close(r["params"], want)
        if mode == "fused":  # the noise of every shard drawn by the cpu kernels
            assert r["warnings"] == []


@pytest.mark.parametrize("name", POSTERIORS)
def test_posterior_of_sharded_model(fsdp_runs, name):
    """sampled_params draws the unsharded model's sample; predictive and the variances agree."""
    _, want = unsharded(name, with_posterior=True)
    for r in fsdp_runs[name]:
        _close(r["drawn"], want["drawn"])
        torch.testing.assert_close(r["predictive"], want["predictive"], rtol=1e-12, atol=1e-13)
        _close(r["variance"], want["variance"])


@pytest.mark.parametrize("case", [c for c, (_, _, poison) in CASES.items() if poison >= 0])
def test_nan_in_one_shard_skips_the_step_everywhere(fsdp_runs, case):
    name, _, poison = CASES[case]
    want = unsharded(name, skip_step=poison)
    for r in fsdp_runs[case]:
        assert r["skipped"] == [t == poison for t in range(STEPS)]
        _close(r["params"], want)


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_distributed_checkpoint_resumes_exactly(fsdp_runs, name):
    for r in fsdp_runs[f"dcp-{name}"]:
        for a, b in zip(r["resumed"], r["uninterrupted"]):
            assert torch.equal(a, b)


def test_shard_noise_runs_on_the_reference(fsdp_runs):
    for r in fsdp_runs["refused"]:
        assert r["message"] is not None and "reference backend only" in r["message"]
        assert r["restored"]
        # Linear(7, 3)'s weight and bias on the reference, Linear(5, 7)'s on the cpu kernels (the
        # split is exact: the misaligned cases above equal the unsharded run)
        assert [w for w in r["warnings"] if "runs 2 of 4 entries on the reference" in w], \
            r["warnings"]
    assert fsdp_runs["refused"][0]["drawn_seed"] == fsdp_runs["refused"][1]["drawn_seed"]


@pytest.mark.parametrize("start", [0, 1, 6, 2 ** 34 + 3])
def test_reference_noise_from_a_shard_start(start):
    """A ``ShardId`` draws the whole parameter's numbers from its start on (normals and E-BiSAM's
    uniforms); its counter word is the id's low 32 bits and the id's high word, as a plain id's,
    moves its first element by 4 per unit (docs/spec.md "Noise")."""
    seed, step, pid, n = 2 ** 40 + 17, 5, 2 ** 32 + 3, 23
    for draw in (R.philox_normal, R.philox_uniform):
        got = draw(seed, step, R.ShardId(pid, start), n)
        if start < 1000:
            assert torch.equal(got, draw(seed, step, pid, start + n)[start:])
            assert torch.equal(got, draw(seed, step, 3, 4 + start + n)[4 + start:])
    first = 4 + start  # high word 1
    i = torch.arange(first, first + n)  # far out: the counter's own words, i // 4 over 32 bits
    x = R.philox4x32(i >> 2 & 0xFFFFFFFF, torch.full_like(i, 3), torch.full_like(i, step),
                     torch.zeros_like(i), seed & 0xFFFFFFFF, seed >> 32)
    assert torch.equal(R._uniform(torch.stack(x).gather(0, (i & 3)[None])[0], torch.float64), got)


# --- the split of a call (ops._split_call), in this process on plain tensors --------------------
SPLIT_OPS = [name for name, op in PHASES.items() if op.takes_ids]
SPLIT_SPEC = [((5, 3), F64), ((7,), F64), ((4, 2), F64), ((9,), F64)]
ODD = [1, 3]  # the entries whose shards start inside a Philox block


def _split_values(name, grad_norm="case"):
    """The op's full argument tuple on SPLIT_SPEC (found_inf and the step tensors None), with
    ``reference.ShardId`` ids at ODD."""
    op = PHASES[name]
    values = dict(zip(op.arg_names, op_args(op, case(name), SPLIT_SPEC, seed=3)))
    ids = list(values["param_ids"])
    ids[1], ids[3] = R.ShardId(ids[1], 6), R.ShardId(ids[3], 2 ** 33 + 1)
    values["param_ids"] = ids
    if grad_norm != "case" and "grad_norm" in values:
        values["grad_norm"] = grad_norm
    return tuple(values.get(n) for n in op.arg_names)


def _cut(op, values, idx):  # the entries idx of every non-empty list and of param_ids
    return tuple([v[i] for i in idx] if (a.type == "Tensor[]" and len(v)) or a.name == "param_ids"
                 else v for a, v in zip(op.args, values))


def _written(op, values):
    return [t.clone() for a, v in zip(op.args, values) if a.written for t in v]


@conftest.needs_ext
@pytest.mark.parametrize("name", SPLIT_OPS)
def test_split_call_runs_the_odd_entries_on_the_reference(name, monkeypatch):
    """The entries at ODD get exactly what the reference gives them, the others exactly what the
    cpu kernels give them alone: every argument reaches both calls, cut to its entries."""
    op = PHASES[name]
    monkeypatch.setattr(ops, "_warned_shards", set())
    norm = torch.tensor(2.5, dtype=F64)  # E-BiSAM's: given, as the optimizer gives it on shards
    split = _split_values(name, norm)
    rest, odd = _split_values(name, norm), _split_values(name, norm)
    with pytest.warns(RuntimeWarning, match=f"{name} runs 2 of 4 entries on the reference"):
        got = ops._split_call(name, _dispatch.implementation(name, CPU, "cpu"), None, ODD, split)
    want = getattr(ops, name)(*_cut(op, rest, [0, 2]), backend="cpu")
    getattr(ops, name)(*_cut(op, odd, ODD), backend="reference")
    by_list = zip(_written(op, split), _written(op, rest), _written(op, odd))
    entries = [i for a in op.args if a.written for i in range(len(SPLIT_SPEC))]
    for i, (s, r, o) in zip(entries, by_list):
        assert torch.equal(s, (o if i in ODD else r)), (name, i)
    if op.result == "norm":
        assert got is not None and torch.equal(got, want)


@conftest.needs_ext
def test_split_call_without_a_norm_runs_wholly_on_the_reference(monkeypatch):
    """E-BiSAM's perturbation with no norm given spans every entry: the reference takes the call."""
    name, op = "ebisam_perturb_", PHASES["ebisam_perturb_"]
    monkeypatch.setattr(ops, "_warned_shards", set())
    split, whole = _split_values(name, None), _split_values(name, None)
    with pytest.warns(RuntimeWarning, match="every entry of the call on the reference"):
        got = ops._split_call(name, _dispatch.implementation(name, CPU, "cpu"), None, ODD, split)
    want = getattr(ops, name)(*whole, backend="reference")
    assert torch.equal(got, want)
    for s, w in zip(_written(op, split), _written(op, whole)):
        assert torch.equal(s, w)


def test_split_call_refuses_a_named_fused_backend():
    name = "bsam_noise_"
    split = _split_values(name)
    before = _written(PHASES[name], split)
    with pytest.raises(ops.OpArgumentError, match="reference backend only"):
        ops._split_call(name, _dispatch.implementation(name, CPU, "cpu"), "cpu", ODD, split)
    for a, b in zip(before, _written(PHASES[name], split)):  # nothing written (backups: NaN)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
