"""``nonfinite="skip_on_device"``: inf/NaN gradients are found and handled on the device.

The optimizer never reads the flag on the host: each gradient-consuming fused op gets the step's
``found_inf`` tensor and takes its skip form when it is set (perturbations only write backups,
updates only restore w; no tensor state changes).  Checked here for every optimizer on the fused
CPU kernels, the Triton kernels (interpreter) and the reference: a poisoned pass leaves the
weights and every tensor of the state bit for bit as they were, finite steps follow the
``"skip"`` policy's trajectory exactly, and nothing in a step reads a tensor on the host.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels import BSAM, SAM, ASAM
from samkernels.ops import reference as ref
from samkernels.optim.bisam import BiSAM, EBiSAM
from samkernels.optim.mfvi import MFVI
from samkernels.optim.random_sam import RandomSAM
from samkernels.optim.vsam import VariationalSAM

from conftest import needs_ext
import helpers

N = 32
MAKERS = {
    "sam_sgd": lambda ps, **kw: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "sam_adam": lambda ps, **kw: SAM(ps, lr=1e-2, rho=0.05, base="adam", **kw),
    "asam": lambda ps, **kw: ASAM(ps, lr=0.1, momentum=0.9, **kw),
    "bsam": lambda ps, **kw: BSAM(ps, lr=0.1, num_data=N, rho=0.01, weight_decay=1e-3, seed=4,
                                  **kw),
    "randomsam": lambda ps, **kw: RandomSAM(ps, lr=0.1, sigma=0.05, momentum=0.9, seed=3, **kw),
    "mfvi": lambda ps, **kw: MFVI(ps, lr=0.1, num_data=N, rho=0.5, var_lr=0.05, momentum=0.9,
                                  seed=3, **kw),
    "vsam": lambda ps, **kw: VariationalSAM(ps, lr=0.1, num_data=N, rho=0.05, momentum=0.9, **kw),
    "bisam": lambda ps, **kw: BiSAM(ps, lr=0.1, rho=0.05, momentum=0.9, **kw),
    "ebisam": lambda ps, **kw: EBiSAM(ps, lr=0.1, rho=0.05, momentum=0.9, seed=3, **kw),
}
ONE_PASS = ("randomsam", "mfvi")
# host-side counters that advance on a device-side skip (documented): the Adam step count
COUNTERS = ("step",)


class Run:
    def __init__(self, name, nonfinite="skip_on_device", dtype=torch.float32, makers=MAKERS,
                 **kw):
        self.model = helpers.mlp(dtype)
        self.opt = makers[name](self.model.parameters(), nonfinite=nonfinite, **kw)
        self.x, self.y = helpers.data(dtype, N, 1)
        self.poison = None  # (index of the pass within the step, value)
        self.calls = 0

    def closure(self, *args):
        ascent = args[-1] if args else True
        self.opt.zero_grad()
        logits = self.model(self.x)
        if isinstance(self.opt, BiSAM) and ascent:
            loss = samkernels.bisam_loss(logits, self.y)
        else:
            loss = F.cross_entropy(logits, self.y)
        loss.backward()
        if self.poison is not None and self.calls == self.poison[0]:
            self.model[2].weight.grad[1, 3] = self.poison[1]
        self.calls += 1
        return loss.detach()

    def step(self, poison=None):
        self.poison, self.calls = poison, 0
        loss = self.opt.step(self.closure)
        self.poison = None
        return loss

    def snapshot(self):
        return ([p.detach().clone() for p in self.model.parameters()],
                copy.deepcopy(self.opt.state_dict()["state"]))


def assert_untouched(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    assert before[1].keys() == after[1].keys()
    for k, st in before[1].items():
        for name, v in st.items():
            if name not in COUNTERS:
                assert torch.equal(after[1][k][name], v), (k, name)


BACKENDS = ["cpu", "reference", "triton"]


def _backend(backend):
    if backend == "triton" and not samkernels._dispatch.triton_usable(torch.device("cpu")):
        pytest.skip("triton (interpreter) not available")
    if backend == "cpu" and samkernels._dispatch.extension() is None:
        pytest.skip("compiled extension not built")
    return samkernels.use_backend(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("bad_pass", [0, 1], ids=["pass1", "pass2"])
def test_poisoned_pass_is_skipped_on_device(backend, name, bad_pass):
    if bad_pass == 1 and name in ONE_PASS:
        pytest.skip("one pass per step")
    with _backend(backend):
        run = Run(name)
        run.step()
        run.step()  # momentum / moments / precision / variances exist
        before = run.snapshot()
        run.step(poison=(bad_pass, float("nan")))
        assert run.calls == (1 if name in ONE_PASS else 2)  # no host decision: every pass runs
        assert not run.opt.is_perturbed
        assert run.opt.step_skipped  # asking reads the device flag
        assert_untouched(before, run.snapshot())
        run.step()
        assert not run.opt.step_skipped
        assert all(torch.isfinite(p).all() for p in run.model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before[0], run.model.parameters()))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_finite_steps_follow_the_host_policy_exactly(backend, name):
    with _backend(backend):
        host, device = Run(name, nonfinite="skip"), Run(name)
        for _ in range(3):
            host.step()
            device.step()
    for p, q in zip(host.model.parameters(), device.model.parameters()):
        assert torch.equal(p, q)


@needs_ext
@pytest.mark.parametrize("name", list(MAKERS))
def test_no_host_read_in_a_step(name, monkeypatch):
    """Instrument every way Python reads a tensor's value, outside the user's closure (on the CPU
    bisam_loss reads the labels to name a bad one); the only reads allowed are of the Adam step
    counters, which live on the CPU whatever the device (as in torch.optim)."""
    run = Run(name)
    run.step()
    counters = {id(st[k]) for st in run.opt.state.values() for k in COUNTERS if k in st}
    reads, in_closure = [], []
    closure = run.closure

    def quiet_closure(*args):
        in_closure.append(True)
        try:
            return closure(*args)
        finally:
            in_closure.pop()
    run.closure = quiet_closure
    for meth in ("__bool__", "item", "__float__", "__int__", "__index__", "tolist", "numpy"):
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, _orig=orig, _meth=meth, **k):
            if id(self) not in counters and not in_closure:
                reads.append((_meth, tuple(self.shape), self.dtype))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, meth, spy)
    with samkernels.use_backend("cpu"):
        run.step()
        run.step(poison=(0, float("inf")))
    monkeypatch.undo()
    assert reads == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_skipped_first_step_leaves_no_uninitialised_state(backend, name, monkeypatch):
    """A NaN in the very first step under skip_on_device: state created in that step (e.g. SGD
    momentum buffers) must not keep what the allocator handed out, since the kernels' skip form
    does not write it.  The allocator is made to hand out NaN (as a reused CUDA block may), then
    a finite step must give finite weights and state; for the optimizers without host counters
    that step equals a clean first step bit for bit (momentum from zeros = torch's buf = d)."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like",
                        lambda t, *a, **k: real(t, *a, **k).fill_(float("nan")))
    with _backend(backend):
        run, clean = Run(name), Run(name)
        run.step(poison=(0, float("nan")))
        assert run.opt.step_skipped
        run.step()
        clean.step()
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    for st in run.opt.state_dict()["state"].values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all(), (name, k)
    if name in ("sam_sgd", "asam", "bisam"):
        for p, q in zip(run.model.parameters(), clean.model.parameters()):
            assert torch.equal(p, q)


def test_gated_ops_reference_skip_forms():
    """The spec's skip forms, on the reference itself: perturbations write only the backups,
    updates only restore w."""
    gen = torch.Generator().manual_seed(0)
    ps = helpers.make_params([(5, 3), (7,)], [torch.float32, torch.float64], gen)
    gs = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ps]
    bs = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ps]
    bufs = helpers.state_like(ps, gen)
    on, off = torch.ones(()), torch.zeros(())
    p0, b0, m0 = [p.clone() for p in ps], [b.clone() for b in bs], [m.clone() for m in bufs]
    ref.sam_perturb_(ps, gs, bs, None, 0.05, 1e-12, False, 0.0, on)
    assert all(torch.equal(a, b) for a, b in zip(ps, p0))
    assert all(torch.equal(a, b) for a, b in zip(bs, p0))
    bs = [b.clone() for b in b0]
    ref.sam_restore_sgd_(ps, gs, bs, bufs, 0.1, 0.9, 0.0, False, 0.0, False, on)
    assert all(torch.equal(a, b) for a, b in zip(ps, b0))
    assert all(torch.equal(a, b) for a, b in zip(bufs, m0))
    ps2 = [p.clone() for p in p0]
    ref.sam_restore_sgd_(ps2, gs, bs, bufs, 0.1, 0.9, 0.0, False, 0.0, False, off)
    assert not any(torch.equal(a, b) for a, b in zip(ps2, b0))  # 0 is the normal form
