"""samkernels.integrations.lightning: SAMModule against a plain samkernels loop on the same batches
(bit for bit in fp32), bf16-mixed, the GradScaler route, accumulation, schedulers, exact resume,
the posterior predictive and the missing-extra error.  CPU, tiny MLP, random data."""
import importlib
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch")

from samkernels import SAM, BSAM  # noqa: E402
from samkernels.optim import RandomSAM, MFVI  # noqa: E402
from samkernels.integrations.lightning import SAMModule  # noqa: E402

N, D, C, BS = 32, 6, 3, 8  # 4 batches per epoch

OPTS = {
    "sam_sgd": lambda ps: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, weight_decay=1e-3),
    "sam_adam": lambda ps: SAM(ps, lr=1e-2, rho=0.05, base="adam"),
    "bsam": lambda ps: BSAM(ps, lr=0.05, num_data=N, rho=0.01, seed=3),
    "randomsam": lambda ps: RandomSAM(ps, lr=0.1, sigma=1e-2, momentum=0.9, seed=4),
    "mfvi": lambda ps: MFVI(ps, lr=0.05, num_data=N, seed=5),
}


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def loader():
    x, y = data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BS,
                                       shuffle=False)


def batches(epochs=1):
    x, y = data()
    return [(x[i:i + BS], y[i:i + BS]) for _ in range(epochs) for i in range(0, N, BS)]


class Net(SAMModule):
    def __init__(self, opt="sam_sgd", sched=None, **kw):
        super().__init__(**kw)
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))
        self.opt_name, self.sched = opt, sched
        self.val_probs = []

    def forward(self, x):
        return self.net(x)

    def training_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = OPTS[self.opt_name](self.parameters())
        if self.sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.sched(opt)}


def trainer(**kw):
    kw.setdefault("devices", 1)
    kw.setdefault("max_epochs", 1)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


def fit(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers / few batches hints
        trainer(**kw).fit(model, loader())
    return model


def plain(opt_name, bs, k=1, autocast=None, sched=None, scaler=None):
    """The same optimizer in a plain loop: k micro-batches per step, each pass backward(loss_i / k)."""
    model = Net(opt_name)
    opt = OPTS[opt_name](model.parameters())
    sch = sched(opt) if sched else None
    for s in range(0, len(bs), k):
        group = bs[s:s + k]

        def closure():
            opt.zero_grad()
            for x, y in group:
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    loss = F.cross_entropy(model(x), y)
                loss = loss / len(group) if len(group) > 1 else loss
                (scaler.scale(loss) if scaler else loss).backward()
        opt.step(closure, scaler=scaler)
        if scaler:
            scaler.update()
        if sch:
            sch.step()
    return model, opt


def same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), (n, (p - q).abs().max())


@pytest.mark.parametrize("opt_name", list(OPTS))
def test_fp32_equals_plain_loop_bitwise(opt_name):
    model = fit(Net(opt_name), max_steps=3)
    assert model.trainer.global_step == 3
    ref, ref_opt = plain(opt_name, batches()[:3])
    same(model, ref)
    lopt = model.trainer.optimizers[0]
    assert not lopt.is_perturbed
    assert repr(lopt.state_dict()["state"]) == repr(ref_opt.state_dict()["state"])


class AscentNet(Net):
    def training_loss(self, batch, ascent):  # a different loss for the ascent pass
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=0.3 if ascent else 0.0)


def test_training_loss_is_told_the_pass():
    model = fit(AscentNet("sam_sgd"), max_steps=2)
    ref = Net("sam_sgd")
    opt = OPTS["sam_sgd"](ref.parameters())
    for x, y in batches()[:2]:
        def closure(ascent):
            opt.zero_grad()
            F.cross_entropy(ref(x), y, label_smoothing=0.3 if ascent else 0.0).backward()
        opt.step(closure)
    same(model, ref)
    plain_model, _ = plain("sam_sgd", batches()[:2])
    assert not torch.equal(plain_model.net[0].weight, model.net[0].weight)


def test_bf16_mixed_equals_plain_loop_under_the_same_autocast():
    model = fit(Net("sam_sgd"), max_steps=3, precision="bf16-mixed")
    ref, _ = plain("sam_sgd", batches()[:3], autocast=torch.bfloat16)
    same(model, ref)  # same ops under the same autocast: bit for bit
    ref32, _ = plain("sam_sgd", batches()[:3])
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), ref32.parameters()))


def test_grad_scaler_is_routed_to_samkernels():
    # "16-mixed" is GPU-only in Lightning; its plugin with a CPU GradScaler exercises the same route:
    # manual_backward scales, opt.step(closure, scaler=) unscales, then scaler.update().
    from lightning.pytorch.plugins.precision import MixedPrecision
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model = fit(Net("bsam"), max_steps=3, plugins=[plugin])
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    ref, _ = plain("bsam", batches()[:3], autocast=torch.float16, scaler=ref_scaler)
    same(model, ref)
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0 ** 13  # updated once per step


@pytest.mark.parametrize("opt_name", ["sam_sgd", "bsam"])
def test_accumulate_grad_batches_is_one_step_on_the_summed_micro_batches(opt_name):
    model = fit(Net(opt_name, accumulate_grad_batches=3), max_epochs=2)
    # 4 batches per epoch, k=3: steps on batches {0,1,2}, {3} (epoch end), {0,1,2}, {3}
    assert model.trainer.global_step == 4
    bs = batches()
    model2 = Net(opt_name)
    opt = OPTS[opt_name](model2.parameters())
    for group in [bs[:3], bs[3:], bs[:3], bs[3:]]:
        def closure():
            opt.zero_grad()
            for x, y in group:
                loss = F.cross_entropy(model2(x), y)
                (loss / len(group) if len(group) > 1 else loss).backward()
        opt.step(closure)
    same(model, model2)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        Net(accumulate_grad_batches=0)


def test_schedulers_are_stepped_per_optimizer_step_and_per_epoch():
    step = lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),  # noqa
                        "interval": "step", "frequency": 2}
    model = fit(Net("sam_sgd", sched=step, accumulate_grad_batches=2), max_epochs=2)
    # 2 optimizer steps per epoch, 4 in all, frequency 2: stepped twice
    sch = model.trainer.lr_scheduler_configs[0].scheduler
    assert sch.last_epoch == 2 and model.trainer.optimizers[0].param_groups[0]["lr"] == 0.1 * 0.25
    epoch = lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # noqa: E731 (epoch)
    model = fit(Net("sam_sgd", sched=epoch), max_epochs=2)
    assert model.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
    # the lr halves after epoch 1: compare with a plain loop that does the same
    model2 = Net("sam_sgd")
    opt = OPTS["sam_sgd"](model2.parameters())
    sch2 = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for e in range(2):
        for x, y in batches():
            def closure():
                opt.zero_grad()
                F.cross_entropy(model2(x), y).backward()
            opt.step(closure)
        sch2.step()
    same(model, model2)


@pytest.mark.parametrize("opt_name", ["bsam", "sam_adam"])
def test_resume_from_ckpt_path_is_exact(opt_name, tmp_path):
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)  # noqa: E731
    full = fit(Net(opt_name, sched=sched), max_epochs=3)
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit(Net(opt_name, sched=sched), max_epochs=1, enable_checkpointing=True, callbacks=[ckpt])
    path = tmp_path / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    if opt_name == "bsam":  # the noise seed and counter after 4 steps are in the checkpoint
        assert saved["samkernels"]["seed"] == 3 and saved["samkernels"]["noise_step"] == 4
    resumed = Net(opt_name, sched=sched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=3).fit(resumed, loader(), ckpt_path=str(path))
    assert resumed.trainer.global_step == 12
    same(resumed, full)
    a, b = full.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    assert repr(a) == repr(b)  # incl. the bSAM noise seed and counter
    assert full.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3


def test_no_checkpoint_while_perturbed():
    model = fit(Net("sam_sgd"), max_steps=1)
    opt = model.trainer.optimizers[0]
    F.cross_entropy(model(batches()[0][0]), batches()[0][1]).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="perturbed"):
        model.on_save_checkpoint({})
    opt.restore()


class Recorder(Net):
    """Saves the batches this rank trained on and its final weights."""
    def training_loss(self, batch):
        self.seen = getattr(self, "seen", [])
        if not any(b is batch for b in self.seen):  # each pass sees every micro-batch
            self.seen.append(batch)
        return super().training_loss(batch)

    def on_train_end(self):
        torch.save({"seen": self.seen, "sd": self.state_dict()}, f"{self.out}/rank{self.global_rank}.pt")


@pytest.mark.parametrize("opt_name", ["sam_sgd", "bsam"])
def test_ddp_two_processes_is_the_optimizer_on_the_global_batch(opt_name, tmp_path):
    model = Recorder(opt_name, accumulate_grad_batches=2)
    model.out = str(tmp_path)
    # gloo, 2 ranks forked from this process (ddp_spawn's ranks imported Lightning again: 17 s -> 5)
    fit(model, max_epochs=2, devices=2, strategy="ddp_fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [len(r["seen"]) for r in ranks] == [4, 4]  # 2 batches per rank and epoch
    for k, v in ranks[0]["sd"].items():
        assert torch.equal(v, ranks[1]["sd"][k]), k  # the ranks stay in sync
    # plain loop: per step the 2 ranks x 2 micro-batches as one batch (equal sizes: the same mean)
    ref = Net(opt_name)
    opt = OPTS[opt_name](ref.parameters())
    for s in range(2):
        x = torch.cat([r["seen"][2 * s + i][0] for r in ranks for i in range(2)])
        y = torch.cat([r["seen"][2 * s + i][1] for r in ranks for i in range(2)])

        def closure():
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
        opt.step(closure)
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        # all-reduce averages per-rank gradients: fp32 rounding differs from one mean
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=n)


def test_sharding_strategies_are_refused(monkeypatch):
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    with pytest.raises(NotImplementedError, match="FSDP"):
        fit(Net("sam_sgd"), max_steps=1)


class PosteriorNet(Net):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_probs.append(self.predictive(x, samples=4))


def test_predictive_in_validation_step():
    model = PosteriorNet("bsam")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=1).fit(model, loader(), loader())
    assert len(model.val_probs) == 4
    opt = model.trainer.optimizers[0]
    x = batches()[0][0]
    model.eval()
    torch.testing.assert_close(model.val_probs[0], opt.predictive(model, x, samples=4, generator=0))
    assert not opt.is_perturbed
    sam = fit(Net("sam_sgd"), max_steps=1)
    with pytest.raises(TypeError, match="no posterior"):
        sam.predictive(x)


def test_missing_lightning_names_the_extra(monkeypatch):
    for mod in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.setitem(sys.modules, mod, None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "samkernels.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install \"samkernels\[lightning\]\""):
        importlib.import_module("samkernels.integrations.lightning")
