"""``capturable=True``: a step whose counters live on the device, so that ``first_step()`` +
``second_step()`` (bSAM: with ``noise_step()``) can be captured once in a CUDA graph and replayed.

The counters the kernels read (the noise / mask counter of bSAM, RandomSAM, MFVI, E-BiSAM and
IVON, IVON's step count t, Adam's per-parameter step) are int64 / float32 tensors on the parameters' device, advanced
there and passed to the ops as ``device_step``.  Checked here on every CPU backend (reference,
cpu, Triton's interpreter): the trajectory equals the host counters' bit for bit, inf/NaN steps
included; nothing in a step reads a tensor on the host (a dispatch mode that fails on every
device-to-host read, the CPU stand-in for a capture); ``state_dict`` is interchangeable with
the host optimizer's; the counters rewind when a step fails; misuse raises.  The capture itself
(replayed N times, equal to eager) is ``tests/test_gpu_ops.py::test_capturable_step_replays``.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import samkernels
from samkernels.optim.ivon import IVON
from samkernels.optim.random_sam import RandomSAM
from samkernels.optim.vsam import VariationalSAM
from samkernels.optim.sam_variants import GSAM, LookSAM, WSAM, FriendlySAM

from test_nonfinite_device import MAKERS, N, Run, _backend

# every optimizer that offers capturable=True, each with the counters it has
CAPTURABLE = dict(MAKERS)
CAPTURABLE.update({
    "sam_adamw": lambda ps, **kw: samkernels.SAM(ps, lr=1e-2, rho=0.05, base="adamw",
                                                 weight_decay=1e-2, **kw),
    "gsam_adam": lambda ps, **kw: GSAM(ps, lr=1e-2, rho=0.05, base="adam", **kw),
    "wsam": lambda ps, **kw: WSAM(ps, lr=0.1, rho=0.05, momentum=0.9, **kw),
    "friendlysam_adam": lambda ps, **kw: FriendlySAM(ps, lr=1e-2, rho=0.05, base="adam", **kw),
    "randomsam_adam": lambda ps, **kw: RandomSAM(ps, lr=1e-2, sigma=0.05, base="adam",
                                                            seed=5, **kw),
    "vsam_adam": lambda ps, **kw: VariationalSAM(ps, lr=1e-2, num_data=N, rho=0.05,
                                                            base="adam", **kw),
    "ivon": lambda ps, **kw: IVON(ps, lr=0.1, ess=N, mc_samples=2, seed=6, **kw),
    "ivon_nodebias": lambda ps, **kw: IVON(ps, lr=0.1, ess=N, debias=False, seed=7, **kw),
    # full steps 0, 2, 4 and one-pass steps 1, 3 (the kind is chosen on the host)
    "looksam": lambda ps, **kw: LookSAM(ps, lr=0.1, rho=0.05, k=2, momentum=0.9, **kw),
    "looksam_adam": lambda ps, **kw: LookSAM(ps, lr=1e-2, rho=0.05, k=2, base="adam", **kw),
})
BACKENDS = ["reference", "cpu", "triton"]


def run(name, capturable, **kw):
    return Run(name, makers=CAPTURABLE, capturable=capturable, **kw)


def same_state(a, b):
    """Two state_dicts equal bit for bit (tensors compared on the CPU)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            same_state(x, y)
        elif isinstance(x, list):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                same_state(u, v) if isinstance(u, dict) else None
                assert isinstance(u, dict) or u == v, k
        elif torch.is_tensor(x):
            assert torch.equal(x.cpu(), y.cpu()), k
        else:
            assert x == y, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CAPTURABLE))
def test_follows_the_host_counters_bit_for_bit(backend, name):
    """Five steps, the third with a NaN gradient (skipped on the device: under skip_on_device
    the counters advance, as the host ones do): weights and the whole state_dict equal the host
    optimizer's bit for bit after every step."""
    with _backend(backend):
        host, cap = run(name, False), run(name, True)
        for i in range(5):
            poison = (0, float("nan")) if i == 2 else None
            host.step(poison)
            cap.step(poison)
            for p, q in zip(host.model.parameters(), cap.model.parameters()):
                assert torch.equal(p, q), (name, i)
            same_state(host.opt.state_dict(), cap.opt.state_dict())
    assert cap.opt.step_skipped is False or bool(cap.opt.step_skipped) is False


class _NoHostReads(TorchDispatchMode):
    """Fails on every op that copies a tensor's value to the host (what a CUDA graph capture
    cannot do): .item(), bool(), int(), float(), torch.equal, nonzero, ..."""
    SYNCS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "allclose"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in self.SYNCS:
            raise AssertionError(f"host read in a capturable step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(CAPTURABLE))
def test_a_step_reads_nothing_on_the_host(name):
    """Outside the closure a capturable step (finite, then poisoned) never reads a tensor's value
    on the host: no counter, no flag, no norm.  On the fused CPU kernels (the op is one opaque
    call to the mode)."""
    if samkernels._dispatch.extension() is None:
        pytest.skip("compiled extension not built")
    r = run(name, True)
    with samkernels.use_backend("cpu"):
        r.step()  # the state exists
        closure = r.closure
        mode = _NoHostReads()

        def outside(*args):  # the user's closure may read what it likes
            with torch.utils._python_dispatch._disable_current_modes():
                return closure(*args)
        r.closure = outside
        with mode:
            r.step()
            r.step(poison=(0, float("inf")))
    assert bool(r.opt.step_skipped)


@pytest.mark.parametrize("name", ["bsam", "randomsam", "mfvi", "ebisam", "ivon", "sam_adam"])
def test_counters_live_on_the_device(name):
    """The counters are tensors on the parameters' device, advanced there; state_dict gives
    their values as the host optimizer saves them (ints; Adam's step a float tensor)."""
    r = run(name, True)
    r.step()
    r.step()
    opt = r.opt
    for c in opt._counters.values():
        assert c.dtype == torch.int64 and c.device == next(r.model.parameters()).device
    extra = opt.state_dict()["samkernels"]
    draws = {"bsam": 2, "randomsam": 2, "mfvi": 2, "ebisam": 2, "ivon": 4, "sam_adam": None}[name]
    if draws is not None:
        assert extra["noise_step"] == draws and isinstance(extra["noise_step"], int)
        assert int(opt._counters["noise_step"]) == draws
    if name == "ivon":  # t, the steps taken (its bias correction)
        assert extra["step"] == 2 and int(opt._counters["step"]) == 2
    for st in opt.state.values():
        if "step" in st:
            assert st["step"].dtype == torch.float32 and float(st["step"]) == 2.0


@pytest.mark.parametrize("name", ["bsam", "mfvi", "sam_adam", "randomsam"])
@pytest.mark.parametrize("direction", ["host_to_capturable", "capturable_to_host"])
def test_state_dict_is_interchangeable(name, direction):
    """A checkpoint of either kind resumes in the other exactly: two steps, save, load into a
    fresh optimizer of the other kind, two more steps == four uninterrupted steps; loading into
    a capturable optimizer that already has counters fills them in place."""
    first = direction == "host_to_capturable"
    whole, a = run(name, False), run(name, not first)
    for _ in range(2):
        whole.step()
        a.step()
    b = run(name, first)
    b.step()  # its counters (capturable) exist and must be overwritten in place
    held = dict(b.opt._counters)
    b.model.load_state_dict(a.model.state_dict())
    b.opt.load_state_dict(copy.deepcopy(a.opt.state_dict()))
    for k, c in held.items():
        assert b.opt._counters[k] is c
    for _ in range(2):
        whole.step()
        b.step()
    for p, q in zip(whole.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["bsam", "randomsam", "ivon", "mfvi"])
def test_a_failed_step_rewinds_the_device_counter(name):
    """An exception in the closure mid-step: the weights are back at the mean and the noise
    counter is where it was, so the retried step draws the same noise as an uninterrupted run."""
    whole, r = run(name, True), run(name, True)
    whole.step()
    r.step()
    closure = r.closure

    def failing(*args):
        out = closure(*args)
        if r.calls == (1 if name in ("randomsam", "mfvi") else 2):
            raise KeyboardInterrupt  # the last pass of the step: the counter moved
        return out
    r.closure = failing
    with pytest.raises(KeyboardInterrupt):
        r.step()
    r.closure = closure
    assert int(r.opt._counters["noise_step"]) == int(whole.opt._counters["noise_step"])
    whole.step()
    r.step()
    for p, q in zip(whole.model.parameters(), r.model.parameters()):
        assert torch.equal(p, q)


def _model():
    return torch.nn.Linear(3, 2)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_needs_a_device_side_policy(nonfinite):
    with pytest.raises(ValueError, match="capturable=True needs nonfinite"):
        samkernels.SAM(_model().parameters(), lr=0.1, nonfinite=nonfinite, capturable=True)


def test_grad_scaler_is_refused():
    m = _model()
    opt = samkernels.SAM(m.parameters(), lr=0.1, nonfinite="skip_on_device", capturable=True)
    m(torch.randn(4, 3)).sum().backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    with pytest.raises(ValueError, match="scaler= with capturable=True"):
        opt.first_step(scaler=scaler)
    assert not opt.is_perturbed


def test_adam_needs_every_parameter_of_a_group_each_step():
    """The step counts of a group advance together on the device: a parameter without a
    gradient would fall behind unseen, so it is an error naming the reason."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = samkernels.SAM(m.parameters(), lr=0.1, base="adam", nonfinite="skip_on_device",
                         capturable=True)
    m[0](torch.randn(4, 3)).sum().backward()  # m[1] has no gradient
    opt.first_step(zero_grad=True)
    m[0](torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="every parameter of a group needs a gradient"):
        opt.second_step()


def test_loading_mixed_step_counts_is_refused():
    """A host run where one parameter missed a step has two Adam step counts in a group, which a
    capturable optimizer cannot keep apart: loading it is an error naming the group."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    host = samkernels.SAM(m.parameters(), lr=0.1, base="adam")
    x = torch.randn(4, 3)
    for i in range(2):
        out = m(x).sum() if i else m[0](x).sum()  # step 0: m[1] has no gradient
        out.backward()
        host.first_step(zero_grad=True)
        (m(x).sum() if i else m[0](x).sum()).backward()
        host.second_step(zero_grad=True)
    cap = samkernels.SAM(m.parameters(), lr=0.1, base="adam", nonfinite="skip_on_device",
                         capturable=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\].*Adam steps \[1.0, 2.0\]"):
        cap.load_state_dict(host.state_dict())



@pytest.mark.parametrize("name", ["bsam", "sam_adam", "ivon"])
def test_distributed_checkpoint_state_creation_as_on_the_host(name):
    """torch.distributed.checkpoint's get_optimizer_state_dict creates the state with one
    zero-gradient step at lr 0 (optimizer state may move, as torch.optim's does; the counters
    are put back): a capturable optimizer does exactly what the host one does, keeping its
    counter tensors in place."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    host, cap = run(name, False), run(name, True)
    cap.step()  # the device counters exist
    host.step()
    held = dict(cap.opt._counters)
    for r in (host, cap):
        get_optimizer_state_dict(r.model, r.opt)
    assert all(cap.opt._counters[k] is c for k, c in held.items())
    for _ in range(2):
        host.step()
        cap.step()
    assert all(map(torch.equal, host.model.parameters(), cap.model.parameters()))
    same_state(host.opt.state_dict(), cap.opt.state_dict())
