"""The step's plan (``TwoPassOptimizer._grouped``, optim/_base.py): the grouping of the parameters
into the lists handed to the ops is cached and reused while nothing changed, and rebuilt exactly
when something did (a gradient appearing or disappearing, a frozen parameter, ``p.data = ...``,
a dtype change, ``add_param_group``).  Checked here: every optimizer's trajectory equals, bit for
bit, the one of a twin that regroups every tensor at every call, through each of those changes;
the lists are reused while nothing changes; the optimizer holds no gradient past its use and no
extra reference to a parameter (``torch.utils.swap_tensors`` still works after a step); and a
steady step's work does not grow with the number of tensors (no per-tensor set work, the backups
of a one-pass step in one copy, Adam's step counts in one row).
"""
import collections
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from samkernels import BSAM, SAM
from samkernels.optim import sam as sam_module
from samkernels.optim import (GSAM, IVON, MFVI, WSAM, EBiSAM, FriendlySAM, LookSAM, RandomSAM,
                              VariationalSAM)

MAKERS = {
    "sam": lambda ps: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, weight_decay=1e-3),
    "sam_adam": lambda ps: SAM(ps, lr=1e-2, rho=0.05, base="adam"),
    "bsam": lambda ps: BSAM(ps, lr=0.1, num_data=64, rho=0.05, seed=1),
    "randomsam": lambda ps: RandomSAM(ps, lr=0.1, sigma=1e-2, momentum=0.9, seed=2),
    "ebisam": lambda ps: EBiSAM(ps, lr=0.1, rho=0.05, momentum=0.9, seed=3),
    "mfvi": lambda ps: MFVI(ps, lr=0.1, num_data=64, seed=4),
    "vsam": lambda ps: VariationalSAM(ps, lr=0.1, num_data=64, momentum=0.9),
    "ivon": lambda ps: IVON(ps, lr=0.1, ess=64, seed=5),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3),
                               torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _twins(name):
    """(model, optimizer with the plan) and (model, optimizer regrouping at every call)."""
    out = []
    for planned in (True, False):
        model = _model()
        opt = MAKERS[name](model.parameters())
        if not planned:
            opt._grouped = opt._grouped_now  # the per-tensor grouping, every call
        out.append((model, opt))
    return out


def _step(model, opt, seed, skip_grad=()):
    """One step on a fixed batch; the parameters in ``skip_grad`` get no gradient."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 2, (16,), generator=g)

    def closure(ascent=False):  # (EBiSAM asks for the pass flag; the same loss in both here)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for p in skip_grad:
            p.grad = None

    opt.step(closure)


def _same(a, b, what):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype and torch.equal(p.detach(), q.detach()), f"{what}: {n}"


@pytest.mark.parametrize("name", MAKERS)
def test_plan_equals_regrouping_through_changes(name):
    (m1, o1), (m2, o2) = _twins(name)
    s = 0

    def both(what, **kw):
        nonlocal s
        s += 1
        _step(m1, o1, s, [dict(m1.named_parameters())[n] for n in kw.get("skip", ())])
        _step(m2, o2, s, [dict(m2.named_parameters())[n] for n in kw.get("skip", ())])
        _same(m1, m2, what)

    for _ in range(2):
        both("steady")
    both("a gradient disappears", skip=("2.bias",))
    both("it stays away", skip=("2.bias",))
    both("it comes back")
    for m in (m1, m2):  # a frozen layer: no gradient, and no noise for it
        m[0].weight.requires_grad_(False)
    both("frozen")
    for m in (m1, m2):
        m[0].weight.requires_grad_(True)
    both("thawed")
    for m in (m1, m2):  # new storage, same values: the plan is rebuilt, nothing else changes
        with torch.no_grad():
            for p in m.parameters():
                p.data = p.data.clone()
    both("new storage")
    both("steady again")


@pytest.mark.parametrize("name", MAKERS)
def test_add_param_group_joins_the_plan(name):
    (m1, o1), (m2, o2) = _twins(name)
    extra = []
    for m, o in ((m1, o1), (m2, o2)):
        head = torch.nn.Linear(2, 2)
        with torch.no_grad():
            head.weight.copy_(torch.eye(2) * 0.5)
            head.bias.fill_(0.1)
        m.append(head)
        extra.append(head)
    _step(m1, o1, 1, list(extra[0].parameters()))  # planned while the head has no group
    _step(m2, o2, 1, list(extra[1].parameters()))
    o1.add_param_group({"params": list(extra[0].parameters())})
    o2.add_param_group({"params": list(extra[1].parameters())})
    for s in (2, 3):
        _step(m1, o1, s)
        _step(m2, o2, s)
        _same(m1, m2, f"after add_param_group, step {s}")
    assert not torch.equal(extra[0].bias.detach(), torch.full((2,), 0.1))  # it trains


def test_dtype_change_rebuilds_the_plan():
    """SAM-SGD without momentum keeps no state: after ``model.double()`` its next step equals a
    new optimizer's on the float64 model (the backups follow the new dtype)."""
    model = _model()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05)
    _step(model, opt, 1)
    model.double()
    ref_model = _model().double()
    ref_model.load_state_dict(model.state_dict())
    ref = SAM(ref_model.parameters(), lr=0.1, rho=0.05)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 2, (16,))
    for m, o in ((model, opt), (ref_model, ref)):
        def closure(m=m, o=o):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        o.step(closure)
    _same(model, ref_model, "after model.double()")


def test_plan_lists_are_reused():
    model = _model()
    opt = MAKERS["sam"](model.parameters())
    _step(model, opt, 1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    first, again = opt._grouped(), opt._grouped()
    assert [ps for _, ps in first] and all(a[1] is b[1] for a, b in zip(first, again))
    model[0].bias.grad = None  # a gradient gone: a new grouping without it
    changed = opt._grouped()
    assert sum(len(ps) for _, ps in changed) == sum(len(ps) for _, ps in first) - 1
    assert all(p is not model[0].bias for _, ps in changed for p in ps)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _wide():
    torch.manual_seed(1)
    return torch.nn.Sequential(*[torch.nn.Linear(5, 5) for _ in range(8)])


def _one_pass_ops(kind, model):
    """The aten / samkernels ops of one ``kind`` step (after a full step made state and plan)."""
    opt = (SAM(model.parameters(), lr=0.1, rho=0.05, momentum=0.9) if kind == "base_step" else
           LookSAM(model.parameters(), lr=0.1, rho=0.05, k=3))
    _step(model, opt, 1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with _CountOps() as counted:
        getattr(opt, kind)()
    return counted.ops


@pytest.mark.parametrize("kind", ["base_step", "reuse_step"])
def test_one_pass_step_copies_the_backups_in_one_op(kind):
    """A step without a first pass (SAM's ``base_step``, LookSAM's ``reuse_step``) sets every
    backup to its weight with one multi-tensor copy per parameter list, not a copy per tensor (on
    2,000 tiny tensors the per-tensor copies made LookSAM's one-pass step slower than its full
    two-pass step: bench/RESULTS.md): the ops it runs do not depend on the number of tensors."""
    small = _one_pass_ops(kind, _model())  # 6 tensors, 16 in _wide()
    large = _one_pass_ops(kind, _wide())
    assert small["aten._foreach_copy_.default"] == 1, small
    assert small == large


@pytest.mark.parametrize("base", ["adam", "adamw"])
def test_adam_counts_are_one_row(base, tmp_path):
    """The Adam step counts stay a 0-dim float32 CPU tensor per parameter in ``state`` (as in
    torch.optim), and those created together are consecutive elements of one storage, so a step
    advances them with one add (``sam._one_row``): the per-tensor ``_foreach_add_`` on CPU scalars
    took 5 of a SAM-Adam step's 11 ms on 2,000 tiny tensors (bench/RESULTS.md).  A checkpoint
    keeps the sharing, so a resumed run takes the same path."""
    model = _wide()
    opt = SAM(model.parameters(), lr=1e-2, rho=0.05, base=base)
    for s in (1, 2):
        _step(model, opt, s)
    steps = [opt.state[p]["step"] for p in model.parameters()]
    assert all(t.shape == () and t.dtype == torch.float32 and float(t) == 2.0 for t in steps)
    assert len(sam_module._one_row(steps)) == len(steps) == 16
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    again = SAM(_wide().parameters(), lr=1e-2, rho=0.05, base=base)
    again.load_state_dict(torch.load(tmp_path / "opt.pt"))
    loaded = [again.state[p]["step"] for p in again.param_groups[0]["params"]]
    assert len(sam_module._one_row(loaded)) == 16
    assert not len(sam_module._one_row([torch.tensor(1.0), torch.tensor(1.0)]))  # separate ones


HASHED = dict(MAKERS,
              looksam=lambda ps: LookSAM(ps, lr=0.1, rho=0.05, k=2),
              friendlysam=lambda ps: FriendlySAM(ps, lr=0.1, rho=0.05),
              gsam=lambda ps: GSAM(ps, lr=0.1, rho=0.05), wsam=lambda ps: WSAM(ps, lr=0.1, rho=0.05))


@pytest.mark.parametrize("name", HASHED)
def test_usual_step_hashes_no_tensor(name, monkeypatch):
    """Once the step's plan is cached, a step's Python work does not grow with the number of
    tensors: no per-tensor set or dict work (``Tensor.__hash__`` is a Python call, ~0.1 us each;
    a set of the parameters in BSAM's usual update, FriendlySAM's per-tensor bookkeeping of its
    momentum took 5 of its 9 ms on 2,000 tiny tensors).  Counted over two steps of 6 and of 16
    tensors: the same."""
    def count(model):
        opt = HASHED[name](model.parameters())
        for s in (1, 2):  # state, plan and memos exist
            _step(model, opt, s)
        calls = [0]
        real = torch.Tensor.__hash__

        def spy(self):
            calls[0] += 1
            return real(self)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "__hash__", spy)
            for s in (3, 4):
                _step(model, opt, s)
        return calls[0]
    assert count(_model()) == count(_wide())


@pytest.mark.parametrize("name", ["sam", "bsam", "vsam"])
def test_no_gradient_held_after_a_phase(name):
    """A gradient freed by zero_grad between the passes is gone: the optimizer keeps none."""
    model = _model()
    opt = MAKERS[name](model.parameters())
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))

    def backward_then(phase):  # a pass, the phase, then zero_grad: its gradients must die
        F.cross_entropy(model(x), y).backward()
        phase()
        refs = [weakref.ref(p.grad) for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(r() is None for r in refs), phase.__name__

    for _ in range(2):
        if name == "bsam":
            opt.noise_step()
        backward_then(opt.first_step)
        backward_then(opt.second_step)


@pytest.mark.parametrize("name", MAKERS)
def test_parameters_can_be_swapped_after_steps(name):
    """The optimizer holds C++ references to its own buffers only: a parameter keeps the use
    count ``torch.utils.swap_tensors`` (``module.to`` under swap mode) needs."""
    model = _model()
    opt = MAKERS[name](model.parameters())
    _step(model, opt, 1)
    _step(model, opt, 2)
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().clone()))


def test_part_devices_are_numbered_densely():
    """The plan numbers its parts' devices 0, 1, ... in order of first appearance, one inf/NaN
    check per number (``_grads_flag``): group 0 on one device and group 1 split over it and
    another gave [0, 0, 2], an empty middle check whose CPU zero was copied to the GPU (a sync
    under skip_on_device).  Meta tensors stand in for a second device."""
    from samkernels.optim._base import _Plan
    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    m = torch.zeros(3, device="meta", requires_grad=True)
    groups = [{"params": [a]}, {"params": [b, m, c]}]
    out = [(groups[0], [a]), (groups[1], [b, c]), (groups[1], [m])]
    assert _Plan(groups, out, with_grad=False).part_device == [0, 0, 1]
