"""The reference trainer end to end on tiny data: every available optimizer learns, the CLI explains
bad input, a resumed run equals an uninterrupted one, runs are deterministic, outputs are written."""
import copy
import dataclasses
import gzip
import json
import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from samkernels.train import ConfigError, TrainConfig, run
from samkernels.train import cli, data as data_mod, engine, runner
from samkernels.optim.utils import bn_frozen
from samkernels.train.optimizers import REGISTRY, Entry, build, get_entry
from samkernels.train.presets import get_preset
from samkernels.train.runner import resolve

# 320 training examples of MNIST-1D, 20 % (64) held out for validation: 256 train (batch 32, 8 steps
# per epoch); 200 test examples; a 64-unit MLP
TINY = dict(train_subset=320, val_fraction=0.2, test_subset=200, batch_size=32, hidden=[64], samples=4,
            progress=False, quiet=True, plots=False)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def need(name: str):
    """Skip (with the reason) when samkernels.optim does not provide the optimizer yet."""
    entry = get_entry(name)
    if not entry.available():
        pytest.skip(f"samkernels.optim has no {entry.classes[0]} yet ({name})")
    return entry


# --------------------------------------------------------------------------------------------
# Every optimizer in the registry learns
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REGISTRY))
def test_loss_goes_down(name):
    need(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # presets may name keys a newer constructor lacks
        res = run(tiny(optimizers=[name], epochs=4))
    (r,) = res["runs"]
    losses = r["history"]["train_loss"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    if name in ("bsam", "mfvi", "vsam", "ivon"):
        pred = r["predictors"]["predictive"]
        assert pred["samples"] == 4 and math.isfinite(pred["metrics"]["nll"])


@pytest.mark.parametrize("name", ["sam", "sam-adam", "sam-adamw", "asam", "vsam"])
def test_first_pass_perturbation_ascends(name):
    """The registry's optimizers perturb uphill: e . g > 0, so L(w + e) > L(w) to first order (a
    flipped sign still trains, and test_loss_goes_down would not see it); SAM's e is rho g / ||g||."""
    entry = need(name)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = build(entry, model.parameters(), dict(entry.defaults), num_data=64.0, seed=0)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    e = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    assert sum((a * b).sum() for a, b in zip(e, g)) > 0
    if name.startswith("sam"):
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        for a, b in zip(e, g):
            torch.testing.assert_close(a, entry.defaults["rho"] * b / norm, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        up = nn.functional.cross_entropy(model(x), y)
    opt.restore()
    with torch.no_grad():
        assert up > nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", ["sam", "bsam"])
def test_msharpness(name, monkeypatch):
    need(name)
    calls = []  # (batch rows, pass) of every closure call
    run_pass = engine.PassClosure.run

    def counting(self, x, y, k, *first):
        calls.append((x.shape[0], k))
        return run_pass(self, x, y, k, *first)

    monkeypatch.setattr(engine.PassClosure, "run", counting)
    cfg = tiny(optimizers=[name], epochs=2, keep_weights=True)
    res = run(dataclasses.replace(cfg, m=4))
    losses = res["runs"][0]["history"]["train_loss"]
    assert res["runs"][0]["run"]["m"] == 4 and losses[-1] < losses[0]
    # 8 steps per epoch, each: 4 micro-batches of 32 / 4 rows, an ascent and a second pass each
    assert calls == [(8, 0), (8, 1)] * 4 * 8 * 2
    calls.clear()
    whole = run(cfg)  # m = 1: one perturbation for the whole batch, another trajectory
    assert calls == [(32, 0), (32, 1)] * 8 * 2
    assert whole["runs"][0]["history"]["train_loss"] != losses
    assert _weights_differ(whole, res)


class NoMicroBatches:
    """Stands for an optimizer whose step() has no m-sharpness (no ``m`` argument)."""

    def __init__(self, params, lr):
        pass

    def step(self, closure=None):
        pass


def test_msharpness_preset_values_and_unsupported_optimizers():
    need("bsam")
    specs = resolve(TrainConfig(preset="bsam-mnist", optimizers=["sgd", "sam", "bsam"]))[-1]
    assert {s.entry.name: s.m for s in specs} == {"sgd": 1, "sam": 8, "bsam": 8}  # Table 6: m = 8
    entry = Entry("nomicro", "NoMicro", __name__, ("NoMicroBatches",), passes=2)
    with pytest.raises(ConfigError, match="no m-sharpness support"):
        runner._msharpness(entry, 2, get_preset("bsam-mnist"))
    # a preset's m the optimizer cannot do falls back to 1, loudly
    preset = dataclasses.replace(get_preset("bsam-mnist"), m={"nomicro": 8})
    with pytest.warns(UserWarning, match="m=8"):
        assert runner._msharpness(entry, None, preset) == 1


# --------------------------------------------------------------------------------------------
# Determinism and resume
# --------------------------------------------------------------------------------------------
def _weights_differ(a, b) -> bool:
    sa, sb = a["runs"][0]["state"], b["runs"][0]["state"]
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


def _same_run(a, b):
    ra, rb = a["runs"][0], b["runs"][0]
    for k in ra["state"]:
        assert torch.equal(ra["state"][k], rb["state"][k]), k
    assert ra["history"] == rb["history"]
    # via JSON: empty calibration bins hold nan, and nan != nan
    assert json.dumps(ra["predictors"], sort_keys=True) == json.dumps(rb["predictors"], sort_keys=True)


@pytest.mark.parametrize("name", ["sgd", "sam", "bsam"])
def test_same_seed_same_result(name):
    need(name)
    cfg = tiny(optimizers=[name], epochs=2, keep_weights=True)
    _same_run(run(cfg), run(cfg))
    other = run(tiny(optimizers=[name], epochs=2, keep_weights=True, seed=1))
    assert other["runs"][0]["history"] != run(cfg)["runs"][0]["history"]


@pytest.mark.parametrize("name", ["sgd", "sam-adam", "bsam"])
def test_resume_equals_uninterrupted(name, tmp_path):
    need(name)
    base = dict(optimizers=[name], epochs=4, keep_weights=True)
    whole = run(tiny(**base))
    ckpt = str(tmp_path / "run.pt")
    part = run(tiny(**base, checkpoint=ckpt, stop_after=2))
    assert part["runs"][0]["epochs_done"] == 2 and not part["runs"][0]["complete"]
    resumed = run(tiny(**base, checkpoint=ckpt, resume=True))
    assert resumed["runs"][0]["complete"]
    _same_run(whole, resumed)


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    run(tiny(optimizers=["sgd"], epochs=1, checkpoint=ckpt))
    with pytest.raises(ConfigError, match="belongs to another run.*hyper"):
        run(tiny(optimizers=["sgd"], epochs=1, checkpoint=ckpt, resume=True, lr=0.01))


# --------------------------------------------------------------------------------------------
# CLI: clear errors
# --------------------------------------------------------------------------------------------
def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--no-progress", "--quiet"])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_unknown_optimizer(capsys):
    err = _cli_error(["--optimizers", "sgd,adamz"], capsys)
    assert "unknown optimizer 'adamz'" in err and "bsam" in err  # lists the known ones


@pytest.mark.parametrize("sweep", ["rho", "rho=", "rho=0.1,,0.2", "=0.1"])
def test_cli_bad_sweep(sweep, capsys):
    assert "--sweep expects key=v1,v2" in _cli_error(["--sweep", sweep], capsys)


def test_cli_bad_set(capsys):
    assert "--set expects key=value" in _cli_error(["--set", "lr"], capsys)
    err = _cli_error(["--optimizers", "sgd", "--set", "rhoo=0.1"], capsys)
    assert "rhoo" in err and "known keys" in err


def test_cli_rho_for_optimizers_without_rho(capsys):
    err = _cli_error(["--optimizers", "sgd", "--rho", "0.1"], capsys)
    # the message names the flag that was used (--rho), not --set, which was not
    assert "--rho 0.1: not a hyper-parameter of sgd" in err and "--set" not in err.splitlines()[-1]
    err = _cli_error(["--optimizers", "sgd", "--set", "rho=0.1"], capsys)
    assert "--set rho: not a hyper-parameter of sgd" in err


def test_header_names_the_preset_in_effect(capsys):
    run(tiny(optimizers=["sgd"], epochs=1, data="digits", quiet=False))
    out = capsys.readouterr().out
    assert "(preset mnist1d" not in out and "no digits preset: settings of preset mnist1d" in out
    run(tiny(optimizers=["sgd"], epochs=1, quiet=False))
    out = capsys.readouterr().out
    assert "(preset mnist1d)" in out and "no mnist1d preset" not in out


def test_learning_curve_epoch_ticks_are_integers():
    from samkernels.train import plots
    res = run(tiny(optimizers=["sgd"], epochs=3))
    fig = plots.learning_curves_figure(res)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plots.plt.close(fig)


def test_cli_missing_data_dir(capsys, tmp_path):
    assert "--data-dir" in _cli_error(["--data", "cifar10", "--optimizers", "sgd"], capsys)
    err = _cli_error(["--data", "mnist", "--optimizers", "sgd", "--data-dir", str(tmp_path)], capsys)
    assert "train-images-idx3-ubyte not found" in err and str(tmp_path) in err


def test_cli_unknown_preset_and_model(capsys):
    assert "unknown preset 'nope'" in _cli_error(["--preset", "nope"], capsys)
    assert "unknown model 'resnet7'" in _cli_error(["--model", "resnet7", "--optimizers", "sgd",
                                                     "--epochs", "1"], capsys)


@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--m", "0"], "--m"), (["--seeds", "0"], "--seeds"), (["--samples", "-1"], "--samples"),
    (["--eval-every", "0"], "--eval-every"), (["--train-subset", "0"], "--train-subset"),
    (["--hidden", "0"], "--hidden"), (["--stop-after", "0"], "--stop-after"),
    (["--label-smoothing", "1.5"], "--label-smoothing"), (["--aug-factor", "0"], "--aug-factor"),
    (["--set", "epochs=0"], "--set epochs"), (["--set", "batch_size=2.5"], "--set batch_size"),
    (["--sweep", "m=1,0"], "--sweep m"), (["--set", "schedule=linear"], "--set schedule")])
def test_cli_rejects_impossible_settings(argv, flag, capsys):
    err = _cli_error(["--optimizers", "sgd,sam"] + argv, capsys)
    assert f"error: {flag} must be" in err, err


def test_cli_m_must_divide_the_batch(capsys):
    err = _cli_error(["--optimizers", "sam", "--batch-size", "30", "--m", "4"], capsys)
    assert "--batch-size 30 is not divisible by --m 4" in err


def test_cli_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "bsam-cifar10-aug" in out and "bisam" in out


# --------------------------------------------------------------------------------------------
# Data: torchvision layouts read without torchvision, augmentation
# --------------------------------------------------------------------------------------------
def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_reads_mnist_layout_and_trains(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    ds = data_mod.load_dataset("mnist", str(tmp_path))
    assert ds.x_train.shape == (64, 1, 28, 28) and ds.y_test.shape == (32,)
    assert abs(ds.x_train.mean().item()) < 1e-4  # standardised with training statistics
    code = cli.main(["--data", "mnist", "--data-dir", str(tmp_path), "--optimizers", "sgd",
                     "--epochs", "1", "--batch-size", "32", "--hidden", "16", "--no-progress"])
    assert code == 0 and "MNIST / mlp-16" in capsys.readouterr().out


def test_reads_cifar_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 20), ("test", 10)):
        batch = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 "fine_labels": list(rng.integers(0, 100, n))}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    ds = data_mod.load_dataset("cifar100", str(tmp_path))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.num_classes == 100 and ds.flip


def test_random_crop_flip_is_a_shift_or_mirror_of_the_padded_image():
    x = torch.randn(6, 2, 8, 8)
    out = data_mod.random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    again = data_mod.random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and torch.equal(out, again)
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        crops = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)


# --------------------------------------------------------------------------------------------
# Presets, hyper-parameters, schedule, BatchNorm
# --------------------------------------------------------------------------------------------
def test_bsam_preset_weight_decay_from_prior_precision():
    need("bsam")
    specs = resolve(TrainConfig(preset="bsam-cifar10-aug", optimizers=["bsam"], m=1))[-1]
    hp = specs[0].hyper
    assert hp["prior_precision"] == 2 and hp["lr"] == 1.0 and hp["betas"] == (0.95, 0.999)
    assert specs[0].augment and specs[0].aug_factor == 4.0
    opt = build(specs[0].entry, [nn.Parameter(torch.zeros(3))], hp, num_data=50000 * 4, seed=0)
    group = opt.param_groups[0]
    assert group["weight_decay"] == pytest.approx(2 / 200000) and group["num_data"] == 200000


def test_overrides_and_sgd_double_epochs():
    need("sam")
    cfg = TrainConfig(optimizers=["sgd", "sam"], epochs=5, sgd_double_epochs=True,
                      overrides={"sam.rho": 0.2, "momentum": 0.5, "gamma": 0.1}, lr=0.03)
    with pytest.raises(ConfigError, match="gamma"):
        resolve(cfg)  # bSAM's damping: neither SGD nor SAM-SGD has it
    cfg.overrides.pop("gamma")
    specs = {s.entry.name: s for s in resolve(cfg)[-1]}
    assert specs["sgd"].epochs == 10 and specs["sam"].epochs == 5
    assert specs["sam"].hyper["rho"] == 0.2 and specs["sgd"].hyper["momentum"] == 0.5
    assert specs["sgd"].hyper["lr"] == specs["sam"].hyper["lr"] == 0.03


def test_cosine_and_step_schedules():
    spec = resolve(tiny(optimizers=["sgd"], epochs=10))[-1][0]
    assert engine.lr_factor(spec, 0, 10) == pytest.approx(1.0)
    assert engine.lr_factor(spec, 50, 10) == pytest.approx(0.5)
    assert engine.lr_factor(spec, 99, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    spec.schedule, spec.milestones = "step", (0.5, 8)
    assert [engine.lr_factor(spec, e * 10, 10) for e in (4, 5, 8)] == pytest.approx([1, 0.1, 0.01])


def test_second_pass_leaves_batchnorm_statistics_alone():
    need("sam")
    from samkernels.optim import SAM
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    reference = copy.deepcopy(model)
    reference(x)  # one forward at w: what the running statistics should become
    opt = SAM(model.parameters(), lr=0.1, rho=0.5)
    loss = engine.PassLoss(nn.functional.cross_entropy)
    closure = engine.PassClosure(model, opt, x, y, loss, nn.functional.cross_entropy,
                                 bn_frozen, lambda: None)
    opt.step(closure)
    assert closure.calls == 2
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked.item() == 1


def _final(cfg):
    res = run(cfg)
    return res, res["runs"][0]


@pytest.mark.parametrize("name, key, value", [("bisam", "mu", 5.0), ("bisam-tanh", "alpha", 1.0),
                                              ("bisam-tanh", "mu", 2.0), ("ebisam", "mu", 5.0)])
def test_bisam_ascent_loss_follows_the_runs_hyper_parameters(name, key, value):
    """--set mu/alpha reaches the ascent loss (it used to be recorded but not used)."""
    need(name)
    cfg = tiny(optimizers=[name], epochs=1, keep_weights=True)
    default, r0 = _final(cfg)
    changed, r1 = _final(dataclasses.replace(cfg, overrides={key: value}))
    assert r1["hyper"][key] == value and r1["ascent_loss"][key] == value
    assert r0["ascent_loss"]["phi"] == ("tanh" if name == "bisam-tanh" else "neglog")
    assert _weights_differ(default, changed)


def test_bisam_presets_write_the_papers_mu_and_alpha():
    need("bisam")
    specs = {s.entry.name: s for s in resolve(TrainConfig(
        preset="bisam-cifar10", optimizers=["bisam", "bisam-tanh", "abisam", "ebisam"]))[-1]}
    assert specs["bisam"].hyper["mu"] == 1.5 and specs["abisam"].hyper["mu"] == 1.5
    assert specs["bisam-tanh"].hyper["mu"] == 10 and specs["bisam-tanh"].hyper["alpha"] == 0.1
    assert specs["ebisam"].hyper["sds_fraction"] == 0.5 and specs["ebisam"].hyper["beta"] == 0.5
    # phi is what defines the tanh variant: fixed, not a key to override
    with pytest.raises(ConfigError, match="phi"):
        resolve(TrainConfig(optimizers=["bisam-tanh"], overrides={"phi": "neglog"}))


def test_ebisam_selection_fraction():
    need("ebisam")
    with pytest.raises(ConfigError, match="gamma is set with sds_fraction"):
        resolve(TrainConfig(optimizers=["ebisam"], overrides={"ebisam.gamma": 0.3}))
    # a plain gamma is bSAM's damping only
    specs = {s.entry.name: s for s in resolve(TrainConfig(optimizers=["bsam", "ebisam"],
                                                          overrides={"gamma": 0.2}))[-1]}
    assert specs["bsam"].hyper["gamma"] == 0.2 and "gamma" not in specs["ebisam"].hyper
    spec = resolve(TrainConfig(optimizers=["ebisam"], overrides={"sds_fraction": 0.25}))[-1][0]
    opt = build(spec.entry, [nn.Parameter(torch.zeros(3))], spec.hyper, num_data=100, seed=0)
    assert opt.gamma == 0.25  # the optimizer's select() keeps what sds_fraction says
    # the second pass sees exactly ceil(0.25 * 32) = 8 examples
    seen = []
    loss = engine.PassLoss(lambda logits, y: seen.append(y.numel()) or logits.sum(),
                           opt.ascent_loss, opt.select)
    logits = torch.randn(32, 10, requires_grad=True)
    y = torch.randint(0, 10, (32,))
    loss(0, logits, y)
    loss(1, logits + 0.1 * torch.randn(32, 10), y)
    assert seen == [8]


@pytest.mark.parametrize("name, key", [("sgd", "sds_fraction"), ("sam", "sds_fraction"),
                                       ("bsam", "sds_fraction"), ("mfvi", "prior_precision")])
def test_trainer_keys_only_where_used(name, key):
    need(name)
    with pytest.raises(ConfigError, match=f"{key}: not a hyper-parameter of {name}"):
        resolve(TrainConfig(optimizers=[name], overrides={key: 0.1}))


def test_prior_precision_offered_with_weight_decay():
    need("sam")
    spec = resolve(TrainConfig(optimizers=["sam"], overrides={"prior_precision": 8.0}))[-1][0]
    assert spec.hyper["prior_precision"] == 8.0


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def test_outputs_and_sweep(tmp_path):
    need("sam")
    out = tmp_path / "out"
    res = run(tiny(optimizers=["sgd", "sam"], epochs=1, seeds=2, sweep=("rho", [0.01, 0.1]),
                   out=str(out), plots=True))
    names = set(os.listdir(out))
    assert {"results.json", "runs.csv", "summary.csv", "table.txt", "learning_curves.png",
            "reliability.png", "sweep_rho.png"} <= names
    # SGD has no rho: it runs once (2 seeds), not once per value, and is the sweep's reference
    assert [r["key"] for r in res["runs"]] == ["sgd-s0", "sgd-s1", "sam-rho=0.01-s0",
                                               "sam-rho=0.01-s1", "sam-rho=0.1-s0", "sam-rho=0.1-s1"]
    assert len(res["summary"]) == 3
    row = next(r for r in res["summary"] if r["optimizer"] == "sam" and r["sweep"] == {"rho": 0.1})
    assert row["seeds"] == [0, 1] and row["accuracy_std"] >= 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["throughput"]["steps"] == 8 and "state" not in saved["runs"][0]
    table = (out / "table.txt").read_text()
    assert "SAM-SGD" in table and "not swept (rho does not apply)" in table
    # what the sweep plot draws: SAM-SGD against rho, SGD as one flat line
    from samkernels.train import plots
    lines, flat = plots.sweep_lines(saved)
    sgd = next(r for r in res["summary"] if r["optimizer"] == "sgd")
    assert list(lines) == ["SAM-SGD"] and [p[0] for p in lines["SAM-SGD"]] == [0.01, 0.1]
    assert lines["SAM-SGD"][1][1:] == pytest.approx(
        (row["accuracy"], row["accuracy_std"], row["nll"], row["nll_std"]))
    assert flat == {"SGD": pytest.approx((None, sgd["accuracy"], sgd["accuracy_std"], sgd["nll"],
                                          sgd["nll_std"]))}


def test_sweep_of_a_training_key_runs_every_optimizer_per_value():
    need("sam")
    specs = resolve(tiny(optimizers=["sgd", "sam"], sweep=("epochs", [1, 2])))[-1]
    assert [(s.entry.name, s.epochs) for s in specs] == [("sgd", 1), ("sam", 1), ("sgd", 2),
                                                          ("sam", 2)]
    # m only concerns the two-pass optimizers: SGD is the reference
    specs = resolve(tiny(optimizers=["sgd", "sam"], sweep=("m", [1, 2])))[-1]
    assert [(s.entry.name, s.sweep) for s in specs] == [("sgd", {}), ("sam", {"m": 1}),
                                                         ("sam", {"m": 2})]
    with pytest.raises(ConfigError, match="repeated"):
        resolve(tiny(optimizers=["sam"], sweep=("rho", [0.1, 0.1])))


def test_variant_entries_take_sams_keywords():
    """GSAM & co. pass **kwargs on to SAM: the trainer must still give them SAM's keywords
    (momentum ...), besides their own, and none of the private base class's."""
    from samkernels.train.optimizers import accepted_keys
    for name, own in (("gsam", "alpha"), ("wsam", "gamma"), ("looksam", "k"),
                      ("friendlysam", "lmbda")):
        keys = accepted_keys(get_entry(name))
        assert {"lr", "rho", "momentum", "nesterov", own} <= set(keys), (name, keys)
        assert "extra" not in keys, keys
