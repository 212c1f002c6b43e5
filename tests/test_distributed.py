"""DistributedDataParallel, 2 processes on gloo over loopback.  With ``ddp_model=model`` the ascent
pass runs under ``no_sync()``: rank r perturbs with the gradient of its own shard, the second pass
all-reduces.  That must equal one process running ``step(closure, m=2)`` with micro-batch r = rank
r's shard (m-sharpness) — for bSAM including the noise (rank r draws micro-batch r's) and the
precision (sqrt(s)|g| averaged over the ranks).  A bad gradient on one rank skips the step on all
(with a GradScaler, every rank's scale backs off).  FSDP2 (fully_shard) is not supported: see README."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from samkernels import BSAM, SAM

WORLD, STEPS = 2, 3

MAKERS = {
    "sam": lambda ps, **kw: SAM(ps, lr=0.1, rho=0.1, momentum=0.9, weight_decay=1e-3, **kw),
    "bsam": lambda ps, **kw: BSAM(ps, lr=0.1, num_data=64, rho=0.05, weight_decay=1e-3, seed=9, **kw),
}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, name, mode, out_dir, poison_step):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=40))
    try:
        model, x, y = model_and_data()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        policy = {"nonfinite": "skip_on_device"} if mode == "device" else {}
        opt = MAKERS[name](ddp.parameters(), ddp_model=ddp, **policy)
        xs, ys = x[rank::WORLD], y[rank::WORLD]  # this rank's shard = micro-batch `rank`
        scaler = torch.amp.GradScaler("cpu") if mode == "scaler" else None
        skipped, scales = [], []

        def closure(ascent):
            opt.zero_grad()
            loss = F.cross_entropy(ddp(xs), ys)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if ascent and rank == 1 and len(skipped) == poison_step:
                model[0].weight.grad[0, 0] = float("nan")  # only this rank's local gradient
            return loss

        for _ in range(STEPS):
            if mode in ("closure", "scaler", "device"):
                opt.step(closure, scaler=scaler)
                if scaler is not None:
                    scaler.update()
                    scales.append(scaler.get_scale())
            else:  # explicit phases: the first backward under no_sync() is the caller's job
                if isinstance(opt, BSAM):
                    opt.noise_step()
                with ddp.no_sync():
                    closure(True)
                opt.first_step(zero_grad=True)
                if not opt.skip_pending:
                    closure(False)
                opt.second_step(zero_grad=True)
            skipped.append(opt.step_skipped)
        torch.save({"params": [p.detach() for p in model.parameters()], "skipped": skipped,
                    "scales": scales, "state": opt.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def single_process(name, skip_step=None):
    """One process, m-sharpness with m = WORLD micro-batches x[i::WORLD]."""
    model, x, y = model_and_data()
    opt = MAKERS[name](model.parameters())

    def closure(i):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i::WORLD]), y[i::WORLD])
        loss.backward()
        return loss

    for t in range(STEPS):
        if t != skip_step:
            opt.step(closure, m=WORLD)
    return [p.detach() for p in model.parameters()], opt


def run_ddp(tmp_path, name, mode, poison_step=-1):
    mp.spawn(_worker, args=(_free_port(), name, mode, str(tmp_path), poison_step), nprocs=WORLD,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name,mode", [("sam", "closure"), ("bsam", "closure"), ("sam", "phases")])
def test_ddp_no_sync_first_pass_is_m_sharpness(tmp_path, name, mode):
    ranks = run_ddp(tmp_path, name, mode)
    want, opt = single_process(name)
    for r in ranks:
        assert r["skipped"] == [False] * STEPS
        for got, w in zip(r["params"], want):
            torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-13)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # the replicas stay identical
    if name == "bsam":
        sd = opt.state_dict()
        assert ranks[0]["state"]["samkernels"]["noise_step"] == sd["samkernels"]["noise_step"]
        for k, st in sd["state"].items():
            torch.testing.assert_close(ranks[1]["state"]["state"][k]["precision"], st["precision"],
                                       rtol=1e-12, atol=0)


@pytest.mark.parametrize("name,mode", [("sam", "closure"), ("bsam", "closure"), ("sam", "scaler"),
                                       ("sam", "device")])
def test_nan_on_one_rank_skips_the_step_everywhere(tmp_path, name, mode):
    """With a GradScaler the clean rank's scale backs off too, so the scales stay equal.
    skip_on_device: the ranks agree through an all-reduce of the device flag (no host read)."""
    ranks = run_ddp(tmp_path, name, mode, poison_step=1)
    want, _ = single_process(name, skip_step=1)
    for r in ranks:
        assert r["skipped"] == [False, True, False]
        assert r["scales"] == ([65536.0, 32768.0, 32768.0] if mode == "scaler" else [])
        for got, w in zip(r["params"], want):
            torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-13)
