"""The trainer's validation split: carved from the training data (seeded, the same for every run),
used for the learning curves and every choice (the sweep value marked per method); the test set
is evaluated once, at the end, and cannot change any choice."""
import dataclasses

import pytest
import torch

from samkernels.train import TrainConfig, run
from samkernels.train import cli, runner
from samkernels.train.data import DataSet, load_dataset

TINY = dict(train_subset=320, val_fraction=0.2, test_subset=200, batch_size=32, hidden=[64],
            samples=4, progress=False, quiet=True, plots=False)


def test_split_is_seeded_disjoint_and_leaves_test_alone():
    full = load_dataset("mnist1d").subset(320, 200)
    a, b = full.split_validation(0.2), full.split_validation(0.2)
    assert a.x_train.shape[0] == 256 and a.x_val.shape[0] == 64
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)  # seeded
    assert torch.equal(a.x_test, full.x_test) and torch.equal(a.y_test, full.y_test)
    # a partition of the training rows: every row lands in exactly one split
    rows = lambda x: {tuple(r.tolist()) for r in x}  # noqa: E731
    assert rows(a.x_train) | rows(a.x_val) == rows(full.x_train)
    assert not rows(a.x_train) & rows(a.x_val)
    other = full.split_validation(0.2, seed=1)
    assert not torch.equal(other.x_val, a.x_val)
    assert full.split_validation(0.0) is full


def _noisy_test(monkeypatch):
    """load_dataset whose test set is replaced by noise and random labels."""
    def noisy(name, data_dir=None, download=False):
        d = load_dataset(name, data_dir, download)
        g = torch.Generator().manual_seed(123)
        return dataclasses.replace(d, x_test=torch.randn(d.x_test.shape, generator=g),
                                   y_test=torch.randint(0, d.num_classes, d.y_test.shape,
                                                        generator=g))
    monkeypatch.setattr(runner, "load_dataset", noisy)


def test_test_set_never_influences_a_choice(monkeypatch):
    cfg = TrainConfig(**TINY, optimizers=["sgd", "bsam"], epochs=2, sweep=("lr", [0.01, 0.2]),
                      keep_weights=True)
    clean = run(cfg)
    _noisy_test(monkeypatch)
    noisy = run(cfg)
    picked = lambda res: [(r["optimizer"], r["predictor"], r["sweep"], r["selected"])  # noqa: E731
                          for r in res["summary"]]
    assert picked(clean) == picked(noisy)
    assert sum(bool(r["selected"]) for r in clean["summary"]) == 3  # sgd mean, bsam mean + pred.
    for a, b in zip(clean["runs"], noisy["runs"]):
        assert a["history"] == b["history"]  # learning curves: validation only
        for p in a["predictors"]:
            assert a["predictors"][p]["val_metrics"] == b["predictors"][p]["val_metrics"]
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    # ... while the test columns did see the noise
    assert clean["summary"][0]["accuracy"] != noisy["summary"][0]["accuracy"]
    assert noisy["summary"][0]["accuracy"] < 0.3


def test_selection_follows_validation_accuracy():
    res = run(TrainConfig(**TINY, optimizers=["sgd"], epochs=2, sweep=("lr", [1e-4, 0.2])))
    rows = res["summary"]
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert [r["selected"] for r in rows] == [r is best for r in rows]
    assert "* the sweep value picked" in runner.format_table(res)


def test_no_validation_split():
    res = run(TrainConfig(**{**TINY, "val_fraction": 0.0}, optimizers=["sgd"], epochs=1,
                          sweep=("lr", [0.01, 0.1])))
    assert res["sizes"] == {"train": 320, "val": 0, "test": 200}
    assert all(r["selected"] is None for r in res["summary"])
    assert all(r["predictors"]["mean"]["val_metrics"] is None for r in res["runs"])


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_cli_bad_val_fraction(value, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--val-fraction", value, "--optimizers", "sgd", "--quiet", "--no-progress"])
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err
