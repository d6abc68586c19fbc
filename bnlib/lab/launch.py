r"""Data-parallel training in several processes on one machine: local, synchronized and ghost BN.

Everything here that needs several processes spawns them itself (``world_size`` processes on this
machine, rendezvous over 127.0.0.1) and returns a plain dict, so a notebook cell stays one call:

* :func:`run_ddp` -- ``world_size`` replicas train one :class:`bnlib.lab.models.CNN` on MNIST with
  :class:`~torch.nn.parallel.DistributedDataParallel`, each on a small per-replica batch, with

  - ``norm="local"``: bnlib's BatchNorm2d, statistics of each replica's own batch;
  - ``norm="sync"``: the same model converted to :class:`bnlib.distributed.SyncBatchNorm`,
    statistics of the union of all replicas' batches;
  - ``norm="ghost"``: :class:`bnlib.variants.GhostBatchNorm2d`, statistics of sub-batches of
    ``ghost_batch`` examples of each replica's batch;

  and reports the test accuracy, the training-loss curve and, per training step, the wall-clock
  time of the step and the time spent in SyncBatchNorm's collectives
  (:func:`bnlib.distributed.communication_timer`; zero for the other norms). DDP's own gradient
  all-reduce overlaps the backward pass and is not counted.
  :func:`run_many` trains several such configurations (norms, seeds) in one spawned job.
* :func:`check_sync_equivalence` -- SyncBatchNorm on ``world_size`` slices of a batch against
  torch.nn's BatchNorm on the whole batch: outputs, input and parameter gradients, running stats;
  and what DDP's gradient all-reduce computes from the replicas' gradients (their mean).

Single-process helpers: :func:`torch_syncbn_cpu_error` (the message with which
``torch.nn.SyncBatchNorm`` refuses CPU input) and :func:`gradient_accumulation_gap` (gradient
accumulation over micro-batches versus one big batch).

**Backend and device** (:func:`pick_backend`): ``nccl`` with one GPU per replica (``cuda:rank``)
when CUDA is available with at least ``world_size`` GPUs, otherwise ``gloo`` on the CPU. Pass
``backend="gloo"`` or ``"nccl"`` to force one. Each replica uses one CPU thread
(``torch.set_num_threads(1)``): the replicas share the machine's cores.

**Determinism**: every replica seeds the same model and reads its slice of one seeded permutation
of the training set; with gloo on the CPU, a sum over two replicas does not depend on their order,
so a run repeated on the same machine gives the same numbers (timings aside).

**Output**: each spawned replica writes its stdout/stderr to a log file, not to the caller's
terminal or notebook; if a replica fails, the error raised here quotes its traceback and log.

From a shell (``run_ddp``'s training only)::

    python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29501 \
        -m bnlib.lab.launch --norm sync --steps 300 --out result.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..distributed import SyncBatchNorm, communication_timer
from ..modules import BatchNorm2d
from ..variants import GhostBatchNorm2d
from . import training
from .data import load_mnist
from .models import CNN

__all__ = ["DEFAULTS", "pick_backend", "run_ddp", "run_many", "compare_norms", "train_replica", "ReplicaStep",
           "replica_order", "check_sync_equivalence", "torch_syncbn_cpu_error", "gradient_accumulation_gap", "main"]

DEFAULTS = dict(norm="sync", world_size=2, batch_per_replica=4, steps=300, lr=0.05, momentum=0.9, seed=0,
                channels=(16, 32), ghost_batch=2, test_examples=10000, log_every=25, backend=None,
                data_root=None)


# ----------------------------------------------------------------------------------------------
# Backend and device
# ----------------------------------------------------------------------------------------------

def pick_backend(world_size: int, backend: str | None = None) -> tuple[str, str]:
    """``(backend, device type)`` for ``world_size`` replicas on this machine.

    ``("nccl", "cuda")`` when CUDA is available with at least ``world_size`` GPUs and torch has
    NCCL, else ``("gloo", "cpu")``. ``backend`` forces ``"gloo"`` (CPU) or ``"nccl"`` (GPU).
    """
    if backend is None:
        enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
        backend = "nccl" if enough_gpus and dist.is_nccl_available() else "gloo"
    if backend == "gloo":
        return "gloo", "cpu"
    if backend == "nccl":
        if not (torch.cuda.is_available() and torch.cuda.device_count() >= world_size):
            raise RuntimeError(f"backend='nccl' needs {world_size} CUDA devices, "
                               f"found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        return "nccl", "cuda"
    raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")


def _replica_device(device_type: str, rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _build_model(cfg: dict) -> nn.Module:
    norm = cfg["norm"]
    if norm in ("local", "sync"):
        model = CNN(channels=tuple(cfg["channels"]), norm="bn")
        return SyncBatchNorm.convert_sync_batchnorm(model) if norm == "sync" else model
    if norm == "ghost":
        if cfg["batch_per_replica"] % cfg["ghost_batch"]:
            raise ValueError(f"ghost_batch={cfg['ghost_batch']} must divide "
                             f"batch_per_replica={cfg['batch_per_replica']}")
        return CNN(channels=tuple(cfg["channels"]),
                   norm=lambda c: GhostBatchNorm2d(c, virtual_batch_size=cfg["ghost_batch"]))
    raise ValueError(f"norm must be 'sync', 'local' or 'ghost', got {norm!r}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReplicaStep(training.Step):
    """The data-parallel update: :class:`bnlib.lab.training.Step` through DDP, timed.

    Records, per update, the wall-clock seconds of the whole step (the GPU synchronized before and
    after) and the seconds and number of SyncBatchNorm collectives
    (:func:`bnlib.distributed.communication_timer`). DDP's own gradient all-reduce -- which averages
    the replicas' gradients -- overlaps the backward pass and is part of the step time only.
    """

    def __init__(self, ddp: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        super().__init__(ddp, optimizer)
        self.device = device
        self.seconds: list[float] = []
        self.comm_seconds: list[float] = []
        self.comm_calls: list[int] = []

    def __call__(self, inputs, labels):
        _synchronize(self.device)
        t0 = time.perf_counter()
        with communication_timer() as timer:
            loss = super().__call__(inputs, labels)
        _synchronize(self.device)
        self.seconds.append(time.perf_counter() - t0)
        self.comm_seconds.append(timer.seconds)
        self.comm_calls.append(timer.calls)
        return loss


def replica_order(n: int, world: int, rank: int, b: int, seed: int, device: torch.device):
    """``step -> indices`` of this replica's ``b`` examples: the global batch of step ``s`` is the
    ``world·b`` consecutive entries number ``s`` (cycling) of one seeded permutation of the ``n``
    training examples, and replica ``rank`` takes its slice of them."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    per_epoch = n // (world * b)

    def indices(step: int) -> torch.Tensor:
        start = ((step % per_epoch) * world + rank) * b
        return order[start:start + b]

    return indices


def _sharded_accuracy(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, n_test: int,
                      device: torch.device) -> float:
    """Test accuracy on the first ``n_test`` examples: each replica scores every world-th example with
    the running statistics (no SyncBatchNorm communication in eval mode), one all-reduce adds up."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = torch.arange(rank, n_test, world)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    if len(shard):
        acc = training.evaluate(model, x_test[shard], y_test[shard], batch_size=1000)
        counts[0], counts[1] = round(acc * len(shard)), len(shard)
    dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def _any_replica(flag: bool, device: torch.device) -> bool:
    """True on every replica if ``flag`` is True on any (so that all replicas stop at the same update)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train_replica(cfg: dict, device: torch.device | str = "cpu") -> dict:
    """Train this replica inside an initialized process group; every rank returns the same summary.

    ``cfg`` overrides :data:`DEFAULTS`. The run is :func:`bnlib.lab.training.train_loop` with this
    replica's slice of each global batch (:func:`replica_order`), the DDP update (:class:`ReplicaStep`),
    one evaluation at the end (:func:`_sharded_accuracy`) and a loss window of ``log_every`` updates.
    """
    cfg = {**DEFAULTS, **cfg}
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg["seed"])  # same initial model everywhere (DDP broadcasts rank 0's anyway)
    model = _build_model(cfg).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    (x_train, y_train), (x_test, y_test) = load_mnist(cfg["data_root"])
    x_train, y_train = x_train.to(device), y_train.to(device, dtype=torch.long)
    b, steps = cfg["batch_per_replica"], cfg["steps"]
    n_test = min(cfg["test_examples"], len(x_test))
    every = max(1, min(cfg["log_every"], steps))

    step = ReplicaStep(ddp, opt, device)
    plan = training.Plan(total=steps, eval_every=steps, loss_every=every, check_every=every, evaluate_first=False)
    hist = training.train_loop(
        ddp, training.indexed_batches((x_train,), y_train, replica_order(len(x_train), world, rank, b,
                                                                          cfg["seed"], device)),
        step, plan, lambda _: _sharded_accuracy(model, x_test, y_test, n_test, device), training.History(),
        any_replica=lambda flag: _any_replica(flag, device))

    # Loss curve: this replica's window means, averaged over the replicas.
    loss_t = torch.tensor(hist.train_loss, dtype=torch.float64, device=device)
    dist.all_reduce(loss_t)
    loss_t = (loss_t / world).cpu()

    skip = min(10, len(step.seconds) // 2)  # warm-up steps are not representative
    stats = torch.tensor([sum(step.seconds[skip:]), sum(step.comm_seconds[skip:])], dtype=torch.float64,
                         device=device)
    dist.all_reduce(stats)
    stats = (stats / world).cpu()
    timed = max(len(step.seconds) - skip, 1)
    return {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k != "data_root"},
        "world_size": world,
        "global_batch": world * b,
        "backend": dist.get_backend(),
        "device": device.type,
        "test_accuracy": hist.final_acc,
        "test_examples": n_test,
        "diverged_at": hist.diverged_at,
        "loss_steps": list(hist.step),
        "loss_curve": loss_t.tolist(),
        "final_train_loss": float(loss_t[-1]) if len(loss_t) else float("nan"),
        "step_ms": 1000 * float(stats[0]) / timed,
        "syncbn_comm_ms": 1000 * float(stats[1]) / timed,
        "syncbn_comm_fraction": float(stats[1] / stats[0]) if stats[0] > 0 else 0.0,
        "syncbn_collectives_per_step": step.comm_calls[-1] if step.comm_calls else 0,
    }


# ----------------------------------------------------------------------------------------------
# SyncBatchNorm over R slices == BatchNorm over the whole batch
# ----------------------------------------------------------------------------------------------

def _equivalence_job(cfg: dict, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    b, c, (h, w) = cfg["batch_per_replica"], cfg["channels"], cfg["spatial"]
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator().manual_seed(cfg["seed"])  # the same full batch on every replica
    x = torch.randn(world * b, c, h, w, generator=g, dtype=dtype) * 2.0 + 5.0  # mean far from 0
    dy = torch.randn(x.shape, generator=g, dtype=dtype)  # upstream gradient ∂L/∂y
    gamma = torch.rand(c, generator=g, dtype=dtype) + 0.5
    beta = torch.randn(c, generator=g, dtype=dtype)

    def layer(cls):
        m = cls(c).to(device=device, dtype=dtype)
        with torch.no_grad():
            m.weight.copy_(gamma)
            m.bias.copy_(beta)
        return m

    mine = slice(rank * b, (rank + 1) * b)
    # This replica's slice through SyncBatchNorm (statistics over every replica's slice) ...
    sync = layer(SyncBatchNorm)
    xs = x[mine].to(device).requires_grad_()
    ys = sync(xs)
    ys.backward(dy[mine].to(device))
    # ... and through a per-replica BatchNorm (statistics of the slice alone), for contrast.
    with torch.no_grad():
        y_local = layer(BatchNorm2d)(x[mine].to(device))

    # Put the pieces together: outputs and input gradients are concatenated, parameter gradients
    # summed over replicas (what DDP's all-reduce does, up to its division by world_size).
    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts).cpu()

    y_sync, dx_sync, y_loc = gather(ys.detach()), gather(xs.grad), gather(y_local)
    dgamma, dbeta = sync.weight.grad.clone(), sync.bias.grad.clone()
    dist.all_reduce(dgamma)
    dist.all_reduce(dbeta)

    # Reference: torch.nn.BatchNorm2d on the whole concatenated batch, in this process.
    ref = layer(nn.BatchNorm2d).cpu()
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(dy)

    def diff(a, b_):
        return float((a.detach().cpu() - b_.detach().cpu()).abs().max())

    return {
        **_ddp_gradient_reduction(cfg, device, dtype, gather),
        "world_size": world, "batch_per_replica": b, "channels": c, "spatial": list(cfg["spatial"]),
        "dtype": cfg["dtype"], "backend": dist.get_backend(), "device": device.type,
        "output": diff(y_sync, yr),
        "input_grad": diff(dx_sync, xr.grad),
        "weight_grad": diff(dgamma, ref.weight.grad),
        "bias_grad": diff(dbeta, ref.bias.grad),
        "running_mean": diff(sync.running_mean, ref.running_mean),
        "running_var": diff(sync.running_var, ref.running_var),
        "local_bn_output": diff(y_loc, yr),  # per-replica statistics: not the same layer
        "output_scale": float(yr.detach().abs().max()),
        "input_grad_scale": float(xr.grad.abs().max()),
    }


def _ddp_gradient_reduction(cfg: dict, device: torch.device, dtype: torch.dtype, gather) -> dict:
    """What DDP's gradient all-reduce computes from the replicas' gradients: their mean, or their sum?

    Each replica takes its own batch (a different seed per rank) through a copy of one small model
    (Conv2d -> ReLU -> Linear), once alone and once wrapped in DDP, and compares DDP's
    gradient with the mean and with the sum of the replicas' own gradients.
    """
    rank = dist.get_rank()
    torch.manual_seed(cfg["seed"])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = model.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(cfg["seed"] + 1 + rank)
    x = torch.randn(cfg["batch_per_replica"], 3, 6, 6, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, 3, (cfg["batch_per_replica"],), generator=g).to(device)

    alone = copy.deepcopy(model)
    nn.functional.cross_entropy(alone(x), y).backward()
    own = _flat_grads(alone)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    nn.functional.cross_entropy(ddp(x), y).backward()
    reduced = _flat_grads(model)
    every = gather(own[None]).to(reduced.device)  # (world, P): each replica's own gradient
    return {
        "ddp_grad_vs_mean": float((reduced - every.mean(0)).abs().max()),
        "ddp_grad_vs_sum": float((reduced - every.sum(0)).abs().max()),
        "ddp_grad_vs_own": float((reduced - own).abs().max()),
        "ddp_grad_scale": float(every.mean(0).abs().max()),
    }


def check_sync_equivalence(world_size: int = 2, batch_per_replica: int = 4, channels: int = 8,
                           spatial: tuple[int, int] = (6, 6), dtype: str = "float32", seed: int = 0,
                           backend: str | None = None, timeout_s: float = 120) -> dict:
    """SyncBatchNorm on ``world_size`` replicas versus torch.nn.BatchNorm2d on the whole batch.

    Spawns ``world_size`` processes. They share one seeded batch of ``world_size·batch_per_replica``
    examples of shape ``(channels, *spatial)`` (mean 5, standard deviation 2), an upstream gradient
    and γ, β; replica ``r`` runs its slice forward and backward through
    :class:`bnlib.distributed.SyncBatchNorm`. The outputs and input gradients are concatenated and
    the γ, β gradients summed over replicas, then compared with ``torch.nn.BatchNorm2d`` run on the
    whole batch in one process.

    Returns a dict of largest absolute differences -- ``output``, ``input_grad``, ``weight_grad``,
    ``bias_grad``, ``running_mean``, ``running_var`` -- plus ``local_bn_output`` (the difference
    when each replica normalizes its slice with its own statistics, for contrast), the scales
    ``output_scale`` and ``input_grad_scale`` (largest |value| of the reference) and the setup.

    The same processes also check what DDP's gradient all-reduce computes: ``ddp_grad_vs_mean``,
    ``ddp_grad_vs_sum`` and ``ddp_grad_vs_own`` are the largest differences between the gradient of a
    small DDP-wrapped model and the mean over replicas, the sum over replicas, and this replica's own
    gradient (each replica on its own batch); ``ddp_grad_scale`` is the largest |value| of the mean.
    """
    cfg = dict(world_size=world_size, batch_per_replica=batch_per_replica, channels=channels,
               spatial=list(spatial), dtype=dtype, seed=seed, backend=backend)
    return _launch("equivalence", cfg, timeout_s)


# ----------------------------------------------------------------------------------------------
# Spawning
# ----------------------------------------------------------------------------------------------

def _train_many(cfg: dict, device: torch.device) -> list:
    """Train one model per entry of ``cfg['runs']`` (overrides of ``cfg``), one after the other."""
    common = {k: v for k, v in cfg.items() if k != "runs"}
    return [train_replica({**common, **run}, device) for run in cfg["runs"]]


_JOBS = {"train": train_replica, "train_many": _train_many, "equivalence": _equivalence_job}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leave(code: int) -> None:
    """End this replica's process now, with exit status ``code``, once its output is flushed.

    A replica's work is done when its process group is destroyed, but the interpreter's own exit
    still tears down what torch.distributed's backends left behind (their C++ objects and
    threads, in an order Python does not control); on recent torch releases that tear-down can
    abort a process that finished its work ("terminate called without an active exception",
    SIGABRT), which the launcher would report as a failed replica. ``os._exit`` skips it, as
    multiprocessing does for its forked workers; the results are already on disk.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _run_replica(rank: int, world: int, port: int, job: str, cfg: dict, outdir: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    backend, device_type = pick_backend(world, cfg.get("backend"))
    device = _replica_device(device_type, rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        result = _JOBS[job](cfg, device)
        if rank == 0:
            Path(outdir, "result.json").write_text(json.dumps(result))
        dist.barrier()  # no replica leaves while another still communicates
    finally:
        gc.collect()  # the job's DDP wrappers and their reducers let go of the group first
        dist.destroy_process_group()


def _spawn_entry(rank: int, world: int, port: int, job: str, cfg: dict, outdir: str, timeout_s: float) -> None:
    # Keep the replica's output (e.g. backend warnings) out of the caller's notebook: to a log file.
    log = os.open(os.path.join(outdir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        _run_replica(rank, world, port, job, cfg, outdir, timeout_s)
    except BaseException:
        Path(outdir, f"rank{rank}.err").write_text(traceback.format_exc())
        _leave(1)
    _leave(0)


def _launch(job: str, cfg: dict, timeout_s: float) -> dict:
    """Run ``_JOBS[job](cfg, device)`` in ``cfg['world_size']`` spawned processes; rank 0's result."""
    world = int(cfg["world_size"])
    if world < 1:
        raise ValueError(f"world_size must be at least 1, got {world}")
    pick_backend(world, cfg.get("backend"))  # fail here, not in the children, on a bad backend
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_spawn_entry, args=(world, _free_port(), job, cfg, outdir, timeout_s),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s + 60
        failure = None
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    failure = f"replicas still running after {timeout_s + 60:.0f} s"
                    break
        except Exception as e:  # a replica failed; join() terminated the others
            failure = f"{type(e).__name__}"
        if failure is None:
            return json.loads(Path(outdir, "result.json").read_text())
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
        details = []
        for r in range(world):
            for kind in ("err", "log"):
                f = Path(outdir, f"rank{r}.{kind}")
                if f.exists() and f.read_text().strip():
                    details.append(f"--- rank {r} {kind} ---\n{f.read_text()[-3000:]}")
        raise RuntimeError(f"bnlib.lab.launch ({job}) failed: {failure}\n" + "\n".join(details))


def run_ddp(config: dict | None = None, timeout_s: float = 600, **kwargs) -> dict:
    """Spawn ``world_size`` processes on this machine, train data-parallel, return the summary.

    ``config`` and keyword arguments override :data:`DEFAULTS`: ``norm`` (``"sync"``, ``"local"``
    or ``"ghost"``), ``world_size``, ``batch_per_replica``, ``steps``, ``lr``, ``momentum``,
    ``seed``, ``channels``, ``ghost_batch``, ``test_examples``, ``log_every``, ``backend`` (None:
    :func:`pick_backend`), ``data_root``. Load MNIST once beforehand (``bnlib.lab.data.load_mnist()``)
    so that the replicas do not all download it.

    Returns the configuration plus ``test_accuracy`` (running statistics, on the first
    ``test_examples`` test images), ``loss_steps``/``loss_curve`` (training loss averaged over
    windows of ``log_every`` steps and over replicas), ``final_train_loss``, ``step_ms``,
    ``syncbn_comm_ms``, ``syncbn_comm_fraction``, ``syncbn_collectives_per_step`` (timings skip the
    first 10 steps), ``backend`` and ``device``.
    """
    return _launch("train", _checked({**DEFAULTS, **(config or {}), **kwargs}, "run_ddp"), timeout_s)


def _checked(cfg: dict, caller: str) -> dict:
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"{caller}: unknown option(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    return cfg


def run_many(runs, timeout_s: float = 900, **kwargs) -> list:
    """:func:`run_ddp` once per entry of ``runs``, all in ONE spawned job (start-up paid once).

    Each entry of ``runs`` is a dict of overrides for that run (e.g. ``{"norm": "sync", "seed": 1}``);
    keyword arguments are :func:`run_ddp`'s and apply to every run (``world_size`` and ``backend`` are
    the same for all). Returns one summary per run, in order, each exactly what :func:`run_ddp` would
    return.
    """
    cfg = _checked({**DEFAULTS, **kwargs}, "run_many")
    runs = [_checked(dict(r), "run_many (an entry of runs)") for r in runs]
    if any(k in r for r in runs for k in ("world_size", "backend")):
        raise ValueError("run_many: world_size and backend must be the same for every run; pass them as keywords")
    return _launch("train_many", {**cfg, "runs": runs}, timeout_s)


def compare_norms(norms=("local", "sync"), timeout_s: float = 900, **kwargs) -> dict:
    """:func:`run_many` with one run per norm in ``norms``; returns ``{norm: summary}``."""
    return dict(zip(norms, run_many([{"norm": n} for n in norms], timeout_s, **kwargs)))


# ----------------------------------------------------------------------------------------------
# Single-process helpers
# ----------------------------------------------------------------------------------------------

def torch_syncbn_cpu_error() -> str | None:
    """The error ``torch.nn.SyncBatchNorm`` raises for a CPU tensor in training mode inside a process group.

    Its check runs before any communication, so a one-process ``gloo`` group (created here over
    127.0.0.1 if none is initialized, and destroyed afterwards) is enough to trigger it. Returns
    the message, or None if this torch version accepts CPU input.
    """
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        nn.SyncBatchNorm(3).train()(torch.randn(4, 3, device="cpu"))
        return None
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if own_group:
            dist.destroy_process_group()


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def gradient_accumulation_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batches: int,
                              dtype: torch.dtype | None = torch.float64) -> dict:
    """One big batch versus gradient accumulation over ``micro_batches`` equal micro-batches.

    Works on two deep copies of ``model`` in training mode (``model`` itself is untouched): one
    computes the cross-entropy gradient of the whole batch ``(x, y)``; the other splits the batch
    into ``micro_batches`` consecutive chunks and accumulates the gradients of each chunk's loss
    divided by ``micro_batches`` -- for a model without batch statistics, the same gradient up to
    rounding. The copies and ``x`` are cast to ``dtype`` (default float64, so that rounding, e.g.
    TF32 convolutions on GPUs, does not blur the comparison; None keeps the model's dtype).

    Returns ``logits_max_diff`` (largest absolute difference of the logits), ``grad_max_diff`` and
    ``grad_rel_diff`` (‖g_acc − g_full‖ / ‖g_full‖ over all parameters).
    """
    n = len(x)
    if micro_batches < 1 or n % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} must divide the batch size {n}")
    full, acc = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    if dtype is not None:
        full, acc, x = full.to(dtype), acc.to(dtype), x.to(dtype)
    for m in (full, acc):
        m.zero_grad(set_to_none=True)
    logits_full = full(x)
    nn.functional.cross_entropy(logits_full, y).backward()
    logits_acc = []
    for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        out = acc(xb)
        (nn.functional.cross_entropy(out, yb) / micro_batches).backward()
        logits_acc.append(out.detach())
    g_full, g_acc = _flat_grads(full), _flat_grads(acc)
    return {
        "micro_batches": micro_batches,
        "micro_batch_size": n // micro_batches,
        "logits_max_diff": float((torch.cat(logits_acc) - logits_full.detach()).abs().max()),
        "grad_max_diff": float((g_acc - g_full).abs().max()),
        "grad_rel_diff": float((g_acc - g_full).norm() / g_full.norm()),
    }


# ----------------------------------------------------------------------------------------------
# torchrun entry point
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Entry point under ``torch.distributed.run`` (reads RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--norm", choices=["sync", "local", "ghost"], default=DEFAULTS["norm"])
    p.add_argument("--batch-per-replica", type=int, default=DEFAULTS["batch_per_replica"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--ghost-batch", type=int, default=DEFAULTS["ghost_batch"])
    p.add_argument("--test-examples", type=int, default=DEFAULTS["test_examples"])
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None, help="write the summary (rank 0) to this JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend, device_type = pick_backend(world, a.backend)
    device = _replica_device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=600))
    try:
        result = train_replica(dict(norm=a.norm, batch_per_replica=a.batch_per_replica, steps=a.steps, lr=a.lr,
                                    seed=a.seed, ghost_batch=a.ghost_batch, test_examples=a.test_examples,
                                    data_root=a.data_root), device)
        if dist.get_rank() == 0:
            text = json.dumps(result, indent=2)
            print(text)
            if a.out:
                Path(a.out).write_text(text)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Under torchrun too, a replica that has finished leaves without the exit-time tear-down.
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    _leave(code)
