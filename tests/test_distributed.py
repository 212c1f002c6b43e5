"""DistributedDataParallel, 2 processes on gloo over loopback.  With ``ddp_model=model`` the ascent
pass runs under ``no_sync()``: rank r perturbs with the gradient of its own shard, the second pass
all-reduces.  That must equal one process running ``step(closure, m=2)`` with micro-batch r = rank
r's shard (m-sharpness) — for bSAM including the noise (rank r draws micro-batch r's) and the
precision (sqrt(s)|g| averaged over the ranks).  A bad gradient on one rank skips the step on all
(with a GradScaler, every rank's scale backs off).  FSDP2 (fully_shard): tests/test_fsdp.py."""
import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from samkernels import BSAM, SAM

import conftest

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


# every DDP run, (name, mode, poison_step): all run in one spawn, one process group
CASES = {f"{name}-{mode}": (name, mode, -1)
         for name, mode in [("sam", "closure"), ("bsam", "closure"), ("sam", "phases")]}
CASES.update({f"nan-{name}-{mode}": (name, mode, 1)
              for name, mode in [("sam", "closure"), ("bsam", "closure"), ("sam", "scaler"),
                                 ("sam", "device")]})


def _run_case(rank, name, mode, poison_step):
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
    return {"params": [p.detach() for p in model.parameters()], "skipped": skipped,
            "scales": scales, "state": opt.state_dict()}


def _worker(rank, port, out_dir):
    in_process_group(rank, port, lambda: [
        torch.save(_run_case(rank, *args), os.path.join(out_dir, f"{case}-rank{rank}.pt"))
        for case, args in CASES.items()])


def in_process_group(rank, port, run):
    """``run()`` on rank ``rank`` of a WORLD-process gloo group (one thread per process)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    # our own store (rank 0 serves it): it outlives the process group for the shutdown handshake
    store = dist.TCPStore("127.0.0.1", port, WORLD, rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    done = False
    try:
        run()
        dist.barrier()
        done = True
    finally:
        # Shut down in lock step (gloo aborts when a peer closes its sockets mid-message): all
        # ranks have left every collective before any destroys the group, and the store's server
        # (rank 0) exits last.
        store.add("finished", 1)
        _wait_count(store, "finished")
        dist.destroy_process_group()
        store.add("left", 1)
        if rank == 0:
            _wait_count(store, "left")
    if done:
        # Every result is saved: leave without the interpreter's teardown, where gloo's and the
        # store's threads can abort the process (SIGABRT, "terminate called without an active
        # exception": rank 0 of the FSDP spawn, once in CI under torch 2.11).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _wait_count(store, key, seconds=60.0):
    deadline = time.monotonic() + seconds
    while store.add(key, 0) < WORLD and time.monotonic() < deadline:
        time.sleep(0.01)


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


class _Spawn:
    """Every case of CASES on WORLD ranks, one spawn, started when collection selects this
    module's tests (conftest.background_job): the ranks run while the other tests do.  ``worker``
    (rank, port, out_dir) saves "<case>-rank<r>.pt" for each of ``cases``."""

    def __init__(self, workdir, worker=_worker, cases=CASES):
        self.out, self.cases = workdir, list(cases)
        self.ctx = mp.start_processes(worker, args=(_free_port(), str(workdir)), nprocs=WORLD,
                                      join=False, start_method="spawn")

    def wait(self):
        """{case: [result of rank r]}."""
        while not self.ctx.join():
            pass
        return {case: [torch.load(self.out / f"{case}-rank{r}.pt", weights_only=False)
                       for r in range(WORLD)] for case in self.cases}

    def kill(self):
        for p in self.ctx.processes:
            if p.is_alive():
                p.kill()


conftest.background_job("ddp")(_Spawn)


@pytest.fixture(scope="module")
def ddp_runs():
    return conftest.job("ddp").wait()


@pytest.mark.parametrize("name,mode", [("sam", "closure"), ("bsam", "closure"), ("sam", "phases")])
def test_ddp_no_sync_first_pass_is_m_sharpness(ddp_runs, name, mode):
    ranks = ddp_runs[f"{name}-{mode}"]
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
def test_nan_on_one_rank_skips_the_step_everywhere(ddp_runs, name, mode):
    """With a GradScaler the clean rank's scale backs off too, so the scales stay equal.
    skip_on_device: the ranks agree through an all-reduce of the device flag (no host read)."""
    ranks = ddp_runs[f"nan-{name}-{mode}"]
    want, _ = single_process(name, skip_step=1)
    for r in ranks:
        assert r["skipped"] == [False, True, False]
        assert r["scales"] == ([65536.0, 32768.0, 32768.0] if mode == "scaler" else [])
        for got, w in zip(r["params"], want):
            torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-13)
