"""Exact resume in a fresh process: train k steps, save model + optimizer + RNG to a file, continue
in a new Python process, and compare with an uninterrupted run bit for bit (weights, momentum, Adam
moments and step, bSAM precision and noise counter).  Data and dropout draw from torch's global RNG,
so the RNG state must travel too.

Run as a script, this file is the fresh process, one for all optimizers:
``python test_resume.py DIR STEPS NAME...`` resumes DIR/NAME-ckpt.pt into DIR/NAME-out.pt."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from samkernels import ASAM, BSAM, SAM

import conftest

MAKERS = {
    "sam_sgd": lambda ps: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "sam_adam": lambda ps: SAM(ps, lr=1e-2, rho=0.05, base="adam", weight_decay=1e-3),
    "asam": lambda ps: ASAM(ps, lr=0.1, momentum=0.9),
    "bsam": lambda ps: BSAM(ps, lr=0.1, num_data=64, rho=0.05, weight_decay=1e-3),  # seed drawn
}
K, MORE = 3, 4


def build(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 3))
    return model, MAKERS[name](model.parameters())  # BSAM draws its seed from the global RNG


def train(model, opt, steps):
    for _ in range(steps):
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))  # fresh data from the global RNG

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)  # dropout: more global RNG draws
            loss.backward()
            return loss

        opt.step(closure)


def snapshot(model, opt):
    return {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}


def resume(name, ckpt, out, steps):
    """The fresh process: build, load, put the RNG back (after the constructor's draw), go on."""
    model, opt = build(name)
    saved = torch.load(ckpt, weights_only=False)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    train(model, opt, steps)
    torch.save(snapshot(model, opt), out)


class _Resume(conftest.ProcessJob):
    """Every optimizer of MAKERS: (uninterrupted run, run resumed after K steps), the resumes all
    in one fresh interpreter, started when collection selects this module's tests
    (conftest.background_job): it runs while the other tests do."""

    def __init__(self, workdir):
        self.workdir, self.want = workdir, {}
        for name in MAKERS:
            model, opt = build(name)
            train(model, opt, K)
            torch.save(snapshot(model, opt), workdir / f"{name}-ckpt.pt")
            train(model, opt, MORE)  # the uninterrupted run
            self.want[name] = snapshot(model, opt)
        self.start([sys.executable, str(Path(__file__).resolve()), str(workdir), str(MORE),
                    *MAKERS], workdir, preexec_fn=conftest.orphan_safe)

    def wait(self):
        proc = self.finish(timeout=240)
        assert proc.returncode == 0, f"the resuming interpreter failed:\n{proc.stderr[-4000:]}"
        return {name: (self.want[name], torch.load(self.workdir / f"{name}-out.pt",
                                                   weights_only=False)) for name in MAKERS}


if __name__ != "__main__":  # under pytest
    conftest.background_job("resume")(_Resume)


@pytest.fixture(scope="module")
def resumed():
    return conftest.job("resume").wait()


@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_in_a_new_process_is_bit_exact(name, resumed):
    want, got = resumed[name]
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert torch.equal(got["rng"], want["rng"])
    assert got["opt"]["samkernels"] == want["opt"]["samkernels"]  # seed, noise counter
    assert got["opt"]["state"].keys() == want["opt"]["state"].keys()
    for i, st in want["opt"]["state"].items():
        for key, v in st.items():
            assert torch.equal(got["opt"]["state"][i][key], v), (i, key)
    if name == "bsam":
        assert want["opt"]["samkernels"]["noise_step"] == K + MORE


if __name__ == "__main__":
    where, steps = Path(sys.argv[1]), int(sys.argv[2])
    for name in sys.argv[3:]:
        resume(name, where / f"{name}-ckpt.pt", where / f"{name}-out.pt", steps)
