"""SAMTrainer (samkernels.integrations.transformers) against plain samkernels loops on the same
batches: a tiny GPT-2 built from GPT2Config on random tokens, CPU, fp32 bit for bit."""
import importlib
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from torch.utils.data import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, get_scheduler  # noqa: E402

from samkernels.optim import BSAM, MFVI, SAM, BiSAM, RandomSAM, VariationalSAM  # noqa: E402
from samkernels.integrations.transformers import SAMTrainer  # noqa: E402

BS, SEQ, N = 4, 16, 32
LR = 0.05


def make_model():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


class Tokens(Dataset):
    def __init__(self, n=N, seed=0):
        self.x = torch.randint(0, 128, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def train_args(path, **kw):
    base = dict(output_dir=str(path), use_cpu=True, report_to=[], per_device_train_batch_size=BS,
                gradient_accumulation_steps=1, max_steps=3, logging_steps=1, save_strategy="no",
                seed=0, train_sampling_strategy="sequential", max_grad_norm=0.0,
                learning_rate=LR, lr_scheduler_type="linear", disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def make_opt(name, model):
    params = list(model.parameters())
    if name == "sam":
        return SAM(params, lr=LR, rho=0.05, momentum=0.9, weight_decay=1e-3)
    if name == "sam_adamw":
        return SAM(params, lr=1e-3, rho=0.05, base="adamw", weight_decay=1e-2)
    if name == "bsam":
        return BSAM(params, lr=LR, num_data=N, rho=0.01, seed=3)
    if name == "randomsam":
        return RandomSAM(params, lr=LR, sigma=1e-3, momentum=0.9, seed=4)
    if name == "mfvi":
        return MFVI(params, lr=LR, num_data=N, rho=0.01, momentum=0.9, seed=5)
    if name == "vsam":
        return VariationalSAM(params, lr=LR, num_data=N, rho=0.05, momentum=0.9)
    raise AssertionError(name)


def plain_loop(name, steps, ga, clip=0.0, bf16=False, shift=False):
    """The README's accumulation recipe: opt.step(closure), the closure summing the step's
    micro-batches; the loss normalised as the Trainer does (the token losses summed over the
    step, divided by the Trainer's count of labels: ``shift`` = its ``_loss_shifts_labels``, False
    for GPT-2 in transformers 5.25, which then counts position 0 too).  Returns the model and the
    per-step first-pass losses."""
    model = make_model()
    model.train()
    opt = make_opt(name, model)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=steps)
    x = Tokens().x
    losses = []
    for s in range(steps):
        micro = [x[(s * ga + j) * BS:(s * ga + j + 1) * BS] for j in range(ga)]
        n_items = sum((m[..., 1:] if shift else m).ne(-100).sum() for m in micro) / 1

        def closure(ascent):
            opt.zero_grad()
            total = 0.0
            for m in micro:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(input_ids=m, labels=m, num_items_in_batch=n_items).loss
                loss.backward()
                total = total + loss.detach()
            if clip and not ascent:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            return total

        losses.append(float(opt.step(closure)))
        sched.step()
    return model, losses


def assert_same(m1, m2, exact=True):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        if exact:
            assert torch.equal(a, b), n
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


def shifts(trainer):
    return getattr(trainer, "_loss_shifts_labels", False)


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", ["sam", "sam_adamw", "bsam", "randomsam", "mfvi", "vsam"])
def test_matches_plain_loop(tmp_path, name):
    model = make_model()
    opt = make_opt(name, model)
    trainer = SAMTrainer(model=model, args=train_args(tmp_path), train_dataset=Tokens(),
                         optimizers=(opt, None))
    trainer.train()
    ref, losses = plain_loop(name, steps=3, ga=1, shift=shifts(trainer))
    assert_same(model, ref)
    assert logged_losses(trainer) == pytest.approx(losses, rel=1e-6)
    assert not opt.is_perturbed


def test_accumulation_is_sam_on_the_whole_batch(tmp_path):
    """gradient_accumulation_steps=2 with clipping: equals the closure loop over both micro-batches
    (bit for bit), and SAM computed by hand in plain torch on the concatenated batch."""
    model = make_model()
    trainer = SAMTrainer(model=model, args=train_args(tmp_path, gradient_accumulation_steps=2,
                                                      max_grad_norm=0.5),
                         train_dataset=Tokens(), sam_optimizer="sam",
                         sam_kwargs={"rho": 0.05, "momentum": 0.9, "weight_decay": 1e-3})
    trainer.train()
    ref, losses = plain_loop("sam", steps=3, ga=2, clip=0.5, shift=shifts(trainer))
    assert_same(model, ref)
    assert logged_losses(trainer) == pytest.approx(losses, rel=1e-6)
    # the scheduler steps once per optimizer step (linear decay over 3 steps), not per micro-batch
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert lrs == pytest.approx([LR, LR * 2 / 3, LR / 3])

    # one step by hand (plain SGD, no clipping): g at w on all 8 examples, e = rho g/|g|, g' at w+e
    model = make_model()
    one_step = train_args(tmp_path / "one", gradient_accumulation_steps=2, max_steps=1,
                          lr_scheduler_type="constant")
    trainer = SAMTrainer(model=model, args=one_step,
                         train_dataset=Tokens(), sam_optimizer="sam", sam_kwargs={"rho": 0.05})
    trainer.train()
    hand = make_model()
    ps = list(hand.parameters())
    batch = Tokens().x[:2 * BS]
    n_items = (batch[..., 1:] if shifts(trainer) else batch).numel()  # the Trainer's divisor

    def grads():
        loss = hand(input_ids=batch, labels=batch, num_items_in_batch=n_items).loss
        return torch.autograd.grad(loss, ps)
    g = grads()
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g))
    w = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, t in zip(ps, g):
            p.add_(t.double().mul(0.05 / norm).float())
    g2 = grads()
    with torch.no_grad():
        for p, w0, t in zip(ps, w, g2):
            p.copy_(w0 - LR * t)
    for a, b in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and not m-sharpness (each micro-batch its own perturbation): that lands elsewhere
    msharp = make_model()
    opt = SAM(msharp.parameters(), lr=LR, rho=0.05)

    def closure(i):
        opt.zero_grad()
        m = batch[i * BS:(i + 1) * BS]
        loss = msharp(input_ids=m, labels=m).loss
        loss.backward()
        return loss
    opt.step(closure, m=2)
    assert max((a - b).abs().max() for a, b in zip(msharp.parameters(), hand.parameters())) > 1e-5


@pytest.mark.parametrize("name,sampling", [("bsam", "sequential"), ("sam", "random")])
def test_resume_is_exact(tmp_path, name, sampling):
    """By name, accumulation 2 (BSAM: noise counter, precisions, moments; SAM: momentum, with
    shuffled batches): 4 steps in one run equal 2 steps, a checkpoint, and 2 more steps in a
    fresh Trainer resumed from it."""
    kw = dict(gradient_accumulation_steps=2, max_steps=4, save_strategy="steps", save_steps=2,
              train_sampling_strategy=sampling)
    sam_kwargs = {"rho": 0.01, "seed": 7} if name == "bsam" else {"rho": 0.05, "momentum": 0.9}
    full = make_model()
    SAMTrainer(model=full, args=train_args(tmp_path / "a", **kw), train_dataset=Tokens(),
               sam_optimizer=name, sam_kwargs=sam_kwargs).train()
    resumed = make_model()
    trainer = SAMTrainer(model=resumed, args=train_args(tmp_path / "b", **kw),
                         train_dataset=Tokens(), sam_optimizer=name, sam_kwargs=sam_kwargs)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert_same(full, resumed)
    if name == "sam":
        return
    # the optimizer state saved mid-run holds bSAM's counter of 2 steps
    sd = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert "samkernels" in sd and sd["state"]
    # and it is the run's own state, not a fresh one: resuming with another seed lands elsewhere
    other = make_model()
    SAMTrainer(model=other, args=train_args(tmp_path / "c", **kw), train_dataset=Tokens(),
               sam_optimizer="bsam", sam_kwargs={"rho": 0.01, "seed": 8}).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert_same(full, other)  # the seed is part of the saved state: the checkpoint's wins


def test_bf16_and_own_scheduler(tmp_path):
    model = make_model()
    opt = make_opt("sam", model)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=2)
    trainer = SAMTrainer(model=model, args=train_args(tmp_path, bf16=True, max_steps=2,
                                                      lr_scheduler_type="constant"),
                         train_dataset=Tokens(), optimizers=(opt, sched))
    trainer.train()
    ref, losses = plain_loop("sam", steps=2, ga=1, bf16=True, shift=shifts(trainer))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same(model, ref)
    assert logged_losses(trainer) == pytest.approx(losses, rel=1e-6)


def test_posterior_predictive_at_evaluation(tmp_path):
    model = make_model()
    opt = make_opt("bsam", model)
    eval_ds = Tokens(n=8, seed=1)
    trainer = SAMTrainer(model=model, args=train_args(tmp_path, max_steps=1,
                                                      per_device_eval_batch_size=8),
                         train_dataset=Tokens(), eval_dataset=eval_ds, optimizers=(opt, None),
                         predictive_samples=3, predictive_seed=5)
    trainer.train()
    out = trainer.predict(eval_ds)
    model.eval()
    with torch.no_grad():
        probs = sum(torch.softmax(_sampled_logits(opt, model, eval_ds.x, 5 + i), -1)
                    for i in range(3)) / 3
        mean_logits = model(input_ids=eval_ds.x).logits
    torch.testing.assert_close(torch.as_tensor(out.predictions), probs.log())
    assert not torch.allclose(probs.log(), torch.log_softmax(mean_logits, -1), atol=1e-4)
    assert "test_loss" in out.metrics
    with pytest.raises(TypeError, match="posterior"):
        sam_model = make_model()
        SAMTrainer(model=sam_model, args=train_args(tmp_path / "s", max_steps=1),
                   train_dataset=Tokens(), eval_dataset=eval_ds,
                   optimizers=(make_opt("sam", sam_model), None),
                   predictive_samples=2).predict(eval_ds)


def _sampled_logits(opt, model, x, seed):
    with opt.sampled_params(generator=seed):
        return model(input_ids=x).logits


def test_argument_errors(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="samkernels optimizer"):
        SAMTrainer(model=model, args=train_args(tmp_path), train_dataset=Tokens())
    with pytest.raises(ValueError, match="sam_optimizer="):
        SAMTrainer(model=model, args=train_args(tmp_path), train_dataset=Tokens(),
                   sam_optimizer="lamb")
    with pytest.raises(TypeError, match="samkernels optimizer"):
        SAMTrainer(model=model, args=train_args(tmp_path), train_dataset=Tokens(),
                   optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match="BiSAM"):
        SAMTrainer(model=model, args=train_args(tmp_path), train_dataset=Tokens(),
                   optimizers=(BiSAM(model.parameters(), lr=0.1), None))


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    monkeypatch.delitem(sys.modules, "samkernels.integrations.transformers")
    with pytest.raises(ImportError, match=r"samkernels\[transformers\]"):
        importlib.import_module("samkernels.integrations.transformers")


def test_no_checkpoint_while_perturbed(tmp_path):
    model = make_model()
    opt = make_opt("sam", model)
    trainer = SAMTrainer(model=model, args=train_args(tmp_path), train_dataset=Tokens(),
                         optimizers=(opt, None))
    x = Tokens().x[:BS]
    model(input_ids=x, labels=x).loss.backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="perturbed"):
        trainer._save_checkpoint(model, None)
    opt.restore()
