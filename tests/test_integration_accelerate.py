"""samkernels.integrations.accelerate: a loop prepared by ``accelerate`` (CPU, tiny MLP) against the
same optimizer in a plain samkernels loop on the same batches: bit for bit in fp32, under the same
bf16 autocast, with gradient accumulation (SAM on the whole window), and with a GradScaler routed
to samkernels' ``scaler=`` (a CPU GradScaler stands in for accelerate's fp16 one, which accelerate
only creates on a GPU)."""
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from samkernels import BSAM, SAM

N, BS = 40, 8  # 5 batches


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


OPTS = {
    "sam_sgd": lambda ps: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4),
    "sam_adam": lambda ps: SAM(ps, lr=1e-2, rho=0.05, base="adam", weight_decay=1e-4),
    "bsam": lambda ps: BSAM(ps, lr=0.05, num_data=N, rho=0.01, seed=0),
}


@pytest.fixture
def acc():
    """A fresh CPU Accelerator per test (AcceleratorState is a per-process singleton)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def make(**kw):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return accelerate.Accelerator(cpu=True, **kw)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _loader():
    x, y = _data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BS)


def _plain(name, windows, autocast=None, scaler=None, lr_lambda=None):
    """The reference: a plain samkernels loop, one step per window of micro-batches (README recipe:
    the closure zeroes, then back-propagates loss_i / k for each micro-batch)."""
    model = _mlp()
    opt = OPTS[name](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    losses = []
    for window in windows:
        k = len(window)

        def closure():
            opt.zero_grad()
            total = None
            for xb, yb in window:
                if autocast:
                    with torch.autocast("cpu", dtype=autocast):
                        out = model(xb)
                    out = out.float()
                else:
                    out = model(xb)
                loss = F.cross_entropy(out, yb)
                part = loss / k if k > 1 else loss
                (scaler.scale(part) if scaler is not None else part).backward()
                total = loss.detach() if total is None else total + loss.detach()
            return total / k if k > 1 else total

        if scaler is not None:
            losses.append(opt.step(closure, scaler=scaler))
            scaler.update()
        else:
            losses.append(opt.step(closure))
        if sched is not None:
            sched.step()
    return model, losses


def _batches():
    return list(_loader())


def _assert_same(m1, m2):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("name", list(OPTS))
def test_prepared_step_closure_fp32_bit_for_bit(acc, name, wrapped):
    from samkernels.integrations.accelerate import SAMAcceleratedOptimizer, prepare
    accelerator = acc()
    model = _mlp()
    opt = OPTS[name](model.parameters())
    if wrapped:
        model, opt, loader = prepare(accelerator, model, opt, _loader())
        assert isinstance(opt, SAMAcceleratedOptimizer)
        assert accelerator._optimizers[0] is opt
    else:
        model, opt, loader = accelerator.prepare(model, opt, _loader())
    losses = []
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss
        losses.append(opt.step(closure))
    ref, ref_losses = _plain(name, [[b] for b in _batches()])
    _assert_same(model, ref)
    if wrapped:  # the wrapper returns the loss; accelerate's own step returns None
        assert [v.item() for v in losses] == [v.item() for v in ref_losses]
        assert not opt.step_was_skipped and not accelerator.optimizer_step_was_skipped
    else:
        assert losses == [None] * len(ref_losses)


def _both_patterns(accelerator, model, opt, loader):
    """Alternate batches between sam_step and the prepared optimizer's step(closure); the losses."""
    from samkernels.integrations.accelerate import sam_step
    losses = []
    for i, (x, y) in enumerate(loader):
        if i % 2:
            losses.append(sam_step(accelerator, opt, lambda a, b: F.cross_entropy(model(a), b),
                                   x, y))
        else:
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                return loss
            losses.append(opt.step(closure))
    return losses


@pytest.mark.parametrize("name", ["sam_sgd", "bsam"])
def test_bf16_matches_plain_loop_under_same_autocast(acc, name):
    from samkernels.integrations.accelerate import prepare
    accelerator = acc(mixed_precision="bf16")
    model = _mlp()
    model, opt, loader = prepare(accelerator, model, OPTS[name](model.parameters()), _loader())
    losses = _both_patterns(accelerator, model, opt, loader)
    ref, ref_losses = _plain(name, [[b] for b in _batches()], autocast=torch.bfloat16)
    _assert_same(model, ref)
    assert [v.item() for v in losses] == [v.item() for v in ref_losses]
    fp32, _ = _plain(name, [[b] for b in _batches()])
    assert not torch.equal(model[0].weight, fp32[0].weight)   # autocast really was on


@pytest.mark.parametrize("name,wrapped", [("sam_sgd", True), ("bsam", True), ("sam_sgd", False)])
def test_accumulate_is_sam_on_the_whole_window(acc, name, wrapped):
    """gradient_accumulation_steps=2 over 5 batches: windows [0, 1], [2, 3] and [4] (the loader's
    end syncs), each one samkernels step whose both passes see every micro-batch of the window.
    sam_step also takes what a plain accelerator.prepare returned."""
    from samkernels.integrations.accelerate import prepare, sam_step
    accelerator = acc(gradient_accumulation_steps=2)
    model = _mlp()
    model, opt, loader = (prepare if wrapped else type(accelerator).prepare)(
        accelerator, model, OPTS[name](model.parameters()), _loader())

    seen = []

    def loss_fn(x, y, ascent):   # told the pass, like a samkernels closure (same loss here)
        seen.append(ascent)
        return F.cross_entropy(model(x), y)

    losses = []
    for x, y in loader:
        with accelerator.accumulate(model):
            losses.append(sam_step(accelerator, opt, loss_fn, x, y))
    b = _batches()
    ref, ref_losses = _plain(name, [b[0:2], b[2:4], b[4:5]])
    _assert_same(model, ref)
    assert losses[0] is None and losses[2] is None
    assert seen == [True, True, False, False] * 2 + [True, False]
    assert [v.item() for v in (losses[1], losses[3], losses[4])] == [v.item() for v in ref_losses]
    if wrapped:  # the wrapper's step(closure) would see one micro-batch only: refused
        with pytest.raises(ValueError, match="sam_step"):
            opt.step(lambda: None)


def test_prepare_leaves_other_optimizers_alone(acc):
    from accelerate.optimizer import AcceleratedOptimizer
    from samkernels.integrations.accelerate import SAMAcceleratedOptimizer, prepare, wrap_optimizer
    accelerator = acc()
    model = _mlp()
    model, opt = prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(opt) is AcceleratedOptimizer
    with pytest.raises(TypeError, match="samkernels optimizer"):
        wrap_optimizer(opt)
    single = prepare(accelerator, SAM(_mlp().parameters(), lr=0.1))
    assert isinstance(single, SAMAcceleratedOptimizer)


def _decay(s):
    return 0.7 ** s


@pytest.mark.parametrize("name", ["sam_adam", "bsam"])
def test_accumulate_with_scheduler_and_save_state_resume(acc, name, tmp_path):
    """A prepared LR scheduler steps once per window; accelerator.save_state between windows and
    load_state into fresh objects continue exactly (optimizer state, bSAM noise counter, lr)."""
    from samkernels.integrations.accelerate import prepare, sam_step

    def setup(seed):
        accelerator = acc(gradient_accumulation_steps=2)
        model = _mlp(seed)
        opt = OPTS[name](model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _decay)
        return (accelerator, *prepare(accelerator, model, opt, sched, _loader()))

    def epoch(accelerator, model, opt, sched, loader):
        losses = []
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = sam_step(accelerator, opt, lambda x, y: F.cross_entropy(model(x), y), x, y)
                sched.step()
            if loss is not None:
                losses.append(loss.item())
        return losses

    run = setup(0)
    first = epoch(*run)
    run[0].save_state(str(tmp_path))
    second = epoch(*run)
    b = _batches()
    ref, ref_losses = _plain(name, [b[0:2], b[2:4], b[4:5]] * 2, lr_lambda=_decay)
    _assert_same(run[1], ref)
    assert first + second == [v.item() for v in ref_losses]

    resumed = setup(7)          # other initial weights: load_state must overwrite them
    resumed[0].load_state(str(tmp_path))
    assert epoch(*resumed) == second
    _assert_same(resumed[1], ref)
    assert resumed[3].get_last_lr() == run[3].get_last_lr()


def test_accumulate_by_hand_differs_from_last_micro_batch_only(acc):
    """The documented definition is not what accelerate's own step(closure) would do (one
    micro-batch): the window's result must differ from SAM on its last micro-batch."""
    b = _batches()
    whole, _ = _plain("sam_sgd", [b[0:2]])
    last, _ = _plain("sam_sgd", [b[1:2]])
    assert not torch.equal(whole[0].weight, last[0].weight)


def test_scaler_routed_to_samkernels_and_skip_on_inf(acc):
    from samkernels.integrations.accelerate import prepare, sam_step
    accelerator = acc()
    # accelerate creates its fp16 GradScaler only on a GPU; a CPU GradScaler takes its place
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    model = _mlp()
    # why the routing is needed: accelerate's own step hands the closure to GradScaler.step, which
    # unscales the gradients already there and calls SAM.step(closure) without the scaler: both
    # passes then run on scaled losses, silently (the update is ~init_scale times too large)
    raw_model = _mlp()
    raw_opt = accelerator.prepare_optimizer(SAM(raw_model.parameters(), lr=0.1))
    assert raw_opt.scaler is accelerator.scaler
    x, y = _batches()[0]

    def raw_closure():
        raw_opt.zero_grad()
        loss = F.cross_entropy(raw_model(x), y)
        accelerator.backward(loss)
        return loss
    raw_closure()               # the usual accelerate iteration: backward, then step
    raw_opt.step(raw_closure)
    one, _ = _plain("sam_sgd", [[(x, y)]], scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    w0 = _mlp()[0].weight
    assert (raw_model[0].weight - w0).abs().max() > 100 * (one[0].weight - w0).abs().max()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    accelerator._optimizers.clear()

    model, opt, loader = prepare(accelerator, model, OPTS["sam_sgd"](model.parameters()), _loader())
    assert opt.scaler is accelerator.scaler
    losses = _both_patterns(accelerator, model, opt, loader)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ref, ref_losses = _plain("sam_sgd", [[b] for b in _batches()], scaler=ref_scaler)
    _assert_same(model, ref)
    assert [v.item() for v in losses] == [v.item() for v in ref_losses]
    assert accelerator.scaler.get_scale() == ref_scaler.get_scale()

    # an inf input: the step is skipped (weights and momentum untouched), the scale backs off
    before = [p.detach().clone() for p in model.parameters()]
    mom = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    scale = accelerator.scaler.get_scale()
    x = torch.full((BS, 6), float("inf"))
    y = torch.zeros(BS, dtype=torch.long)
    sam_step(accelerator, opt, lambda x, y: F.cross_entropy(model(x), y), x, y)
    assert opt.step_was_skipped and accelerator.optimizer_step_was_skipped
    assert accelerator.scaler.get_scale() == scale / 2
    for p, w, m in zip(model.parameters(), before, mom):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)


def test_missing_accelerate_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.delitem(sys.modules, "accelerate.optimizer", raising=False)
    monkeypatch.delitem(sys.modules, "samkernels.integrations.accelerate", raising=False)
    with pytest.raises(ImportError, match=r"samkernels\[accelerate\]"):
        importlib.import_module("samkernels.integrations.accelerate")
