"""Data-parallel training under ``torchrun``: the same recipe, model and loss as ``training.train``, on several
processes (``DistributedDataParallel``; gloo on CPU, NCCL on GPU).

What a run keeps equal to the one-process recipe, and how:

- the *global* batch: each rank takes ``batch_size / world`` samples of one global batch, drawn by a
  ``DistributedSampler`` (one seeded permutation per epoch, ``set_epoch`` every epoch, ``drop_last`` so that no
  sample is duplicated); batch ``k`` of the job is positions ``[k*B, (k+1)*B)`` of that epoch's permutation
  whatever the world size, so a 1-process run of this loop sees the same samples per step;
- the step budget, the optimizer and its schedule (``training.train.make_optimizer``), the stages;
- the initial weights: every rank seeds alike and builds the same model (DDP also broadcasts rank 0's);
- BatchNorm statistics over the global batch: ``SyncBatchNorm`` (torch's refuses CPU tensors - "SyncBatchNorm
  layers only work with GPU modules", measured with torch 2.13 - so on CPU a BatchNorm whose batch statistics are
  all-reduced with autograd, ``GlobalBatchNorm2d``, does the same);
- evaluation on the whole test split once: each rank predicts a contiguous, unpadded slice and the slices are
  gathered in order (``DistributedSampler`` would pad with duplicates).

Elastic: rank 0 saves the run state (model, optimizer, scheduler, stage, step, sampler epoch and offset, RNG)
every ``checkpoint_every`` steps under ``artifacts/elastic/<model>-<run id>/``; when ``torchrun --max-restarts``
restarts the workers after a rank died, they resume from it (the state is deleted when the job ends). Rank 0
alone writes the final checkpoint and record (which says the world size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from training import paths
from training.checkpoints import save_checkpoint
from training.fingerprint import host_fingerprint, weights_fingerprint
from training.registry import ModelSpec, get_spec
from training.train import (
    PRECISIONS,
    bar_failures,
    make_optimizer,
    predict,
    prepare,
    stage_parameters,
    train_step,
    training_forward,
)

# Test hook: the rank ATTNZOO_FAULT_RANK kills itself (SIGKILL, as an OOM killer or a lost node would) before
# global step ATTNZOO_FAULT_STEP of the first attempt; torchrun's restart then has to resume the job.
FAULT_RANK, FAULT_STEP = "ATTNZOO_FAULT_RANK", "ATTNZOO_FAULT_STEP"
# Test hook: a folder where each rank writes the training-sample indices it drew, per epoch.
TRACE_DIR = "ATTNZOO_DDP_TRACE"
STORE_TIMEOUT = timedelta(minutes=5)


class DistributedError(RuntimeError):
    """One line: why this job cannot run distributed as asked."""


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device
    run_id: str
    restart: int  # torchrun's restart count (0: the first attempt)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def join() -> Context:
    """Join the process group torchrun describes: NCCL with one GPU per local rank where CUDA is available,
    gloo on CPU otherwise."""
    if not launched():
        raise DistributedError("not started by torchrun: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are unset")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and os.environ.get("ATTNZOO_DDP_BACKEND", "") != "gloo"
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if not dist.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        print(f"rank {rank}/{world}: joining {backend} via {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
              f"(attempt {restart})", file=sys.stderr, flush=True)
        # The store keys of each attempt under their own prefix: after a restart, an address that a killed rank
        # published in the previous attempt must never be read (measured: rank 0 then dialled the dead rank's
        # port, "Connection refused", and the restarted job failed).
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=rank == 0
                              and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True", timeout=STORE_TIMEOUT)
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{restart}", store), rank=rank,
                                world_size=world)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, backend, device,
                   os.environ.get("TORCHELASTIC_RUN_ID", "none"), restart)


# --------------------------------------------------------------------------------------------- BatchNorm


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks, with the gradient summed back (each rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's: per-channel sums all-reduced across ranks
    (``AllReduceSum`` carries the gradient back). What ``nn.SyncBatchNorm`` does,
    for CPU/gloo where torch's refuses; in eval mode it is a plain BatchNorm2d (same state dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        xf = x.float()  # statistics in float32 also under bfloat16 autocast (as BatchNorm computes them)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32)
        stats = AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """Every BatchNorm2d made global-batch: ``nn.SyncBatchNorm`` on GPU, ``GlobalBatchNorm2d`` on CPU (same
    parameters and buffers); returns the model and how many layers were converted."""
    if device.type == "cuda":
        before = sum(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d) for m in model.modules())
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), before
    count = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:  # the exact type: a subclass may override forward
            m.__class__ = GlobalBatchNorm2d
            count += 1
    return model, count


def plain_batchnorm(model: nn.Module) -> nn.Module:
    """Undo ``sync_batchnorm`` on CPU (what is saved and exported is the spec's own model)."""
    for m in model.modules():
        if type(m) is GlobalBatchNorm2d:
            m.__class__ = nn.BatchNorm2d
    return model


# ---------------------------------------------------------------------------------------------- batches


class ShardedBatches:
    """This rank's part of each global batch, epoch after epoch (a ``DistributedSampler`` with ``set_epoch``).
    ``epoch`` and ``offset`` (batches already drawn this epoch) are its resumable state."""

    def __init__(self, data: dict[str, np.ndarray], global_batch: int, rank: int, world: int, seed: int,
                 epoch: int = 0, offset: int = 0) -> None:
        if global_batch % world:
            raise DistributedError(f"the global batch {global_batch} is not divisible by the world size {world}; "
                                   f"run with a --nproc-per-node x --nnodes that divides it")
        self.data, self.per_rank, self.epoch, self.offset = data, global_batch // world, epoch, offset
        n = len(data["label"])
        self.sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.per_epoch = len(self.sampler) // self.per_rank
        if self.per_epoch == 0:
            raise DistributedError(f"{n} training samples give no full batch of {global_batch} over {world} ranks")
        self.trace: dict[int, list[int]] = {}
        self._order: list[int] = []
        self._order_epoch = -1

    def indices(self) -> list[int]:
        """The sample indices of this rank's next batch (advancing the state)."""
        if self.offset >= self.per_epoch:
            self.epoch, self.offset = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self.sampler.set_epoch(self.epoch)  # without it every epoch repeats the first one's order
            self._order, self._order_epoch = list(self.sampler), self.epoch
        idx = self._order[self.offset * self.per_rank : (self.offset + 1) * self.per_rank]
        self.offset += 1
        self.trace.setdefault(self.epoch, []).extend(idx)
        return idx

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = np.asarray(self.indices())
        return {k: torch.from_numpy(v[idx]) for k, v in self.data.items()}


# ------------------------------------------------------------------------------------------- evaluation


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of ``n`` samples: the slices tile [0, n) with no padding."""
    return n * rank // world, n * (rank + 1) // world


@torch.no_grad()
def distributed_predict(spec: ModelSpec, model: nn.Module, data: dict[str, np.ndarray],
                        ctx: Context) -> dict[str, np.ndarray]:
    """The outputs over the whole split, each sample predicted once by one rank, gathered in order."""
    lo, hi = shard_bounds(len(data["label"]), ctx.rank, ctx.world)
    part = predict(spec, model, {k: v[lo:hi] for k, v in data.items()}) if hi > lo else {}
    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, part)
    return {k: np.concatenate([p[k] for p in parts if p]) for k in spec.output_names}


def distributed_evaluate(spec: ModelSpec, model: nn.Module, test: dict[str, np.ndarray],
                         ctx: Context) -> dict[str, float]:
    outputs = distributed_predict(spec, model, test, ctx)
    metrics = spec.task.metrics(outputs, test)
    if spec.train.metrics is not None:
        metrics.update(spec.train.metrics(outputs, test))
    return metrics


# ------------------------------------------------------------------------------------------ run state


class TrainingForward(nn.Module):
    """What DDP wraps: the loss's view of the model (``training_forward``), so that every training forward
    passes through DDP's ``forward`` (which prepares the gradient all-reduce)."""

    def __init__(self, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__()
        self.spec, self.model = spec, model

    def forward(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return training_forward(self.spec, self.model, feeds)


def run_dir(name: str, run_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return paths.ARTIFACTS_DIR / "elastic" / f"{name}-{safe}"


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a rank killed while saving leaves the previous state


def _broadcast_state(model: nn.Module) -> None:
    """Every rank gets rank 0's parameters and buffers (after a stage's setup, which may differ by rank)."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)


def _fault(ctx: Context, step: int) -> None:
    if ctx.restart == 0 and os.environ.get(FAULT_RANK) == str(ctx.rank) and os.environ.get(FAULT_STEP) == str(step):
        print(f"rank {ctx.rank}: killed at step {step} ({FAULT_RANK}/{FAULT_STEP})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def train_model(model: str | ModelSpec, steps: int | None = None, train_size: int | None = None,
                test_size: int | None = None, save: bool = True, progress: bool = True,
                checkpoint_every: int = 100, initializer: Callable[[nn.Module], Any] | None = None) -> dict[str, Any]:
    """``training.train.train_model`` on every rank of a torchrun job; returns the record (on every rank, saved
    by rank 0). ``initializer`` (fine-tuning, training.finetune) loads the starting weights and may return the
    optimizer's parameter groups."""
    ctx = join()
    spec = model if isinstance(model, ModelSpec) else get_spec(model)
    r = spec.train
    # every rank alike: the same seed, so the same initial weights (DDP broadcasts rank 0's anyway)
    train, test, net, groups, stages = prepare(spec, steps, train_size, test_size, initializer)
    net, n_bn = sync_batchnorm(net, ctx.device)
    net = net.to(ctx.device)
    global_batch = min(r.batch_size, len(train["label"]) // ctx.world * ctx.world)
    batches = ShardedBatches(train, global_batch, ctx.rank, ctx.world, r.seed)
    fingerprint = weights_fingerprint(spec, steps, len(train["label"]), len(test["label"]))
    state_path = run_dir(spec.name, ctx.run_id) / "state.pt"
    resume = _load_resume(state_path, fingerprint, ctx)
    if r.precision not in PRECISIONS:
        raise DistributedError(f"model {spec.name!r}: unknown training precision {r.precision!r}")
    done = sum(st.steps for st in stages[: resume["stage"]]) if resume else 0
    start = time.perf_counter()
    for si, st in enumerate(stages):
        if resume and si < resume["stage"]:
            continue
        mid = resume is not None and si == resume["stage"]
        if st.setup is not None:
            st.setup(net, train)  # on resume too: it sets what is not state (e.g. a phase); the state then wins
        if mid:
            net.load_state_dict(resume["model"])
            batches.epoch, batches.offset = resume["epoch"], resume["offset"]
            torch.set_rng_state(resume["rng"])
        else:
            _broadcast_state(net)
        lr = r.lr if st.lr is None else st.lr
        params = stage_parameters(st, net)
        opt, sched = make_optimizer(groups(net, params, lr) if groups else params, lr, r.weight_decay, st.steps)
        first = 0
        if mid:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            first = resume["step"]
            resume = None
        ddp = nn.parallel.DistributedDataParallel(
            TrainingForward(spec, net), device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=len(stages) > 1)  # a stage's forward may leave other stages' parameters out
        loss_fn = st.loss or r.loss or spec.task.loss
        net.train()
        bar = tqdm(range(first, st.steps), desc=f"train {spec.name} [rank {ctx.rank}/{ctx.world}]"
                   + (f" [{st.name}]" if len(stages) > 1 else ""), disable=not (progress and ctx.is_main),
                   leave=False, mininterval=2, initial=first, total=st.steps)
        for step in bar:
            _fault(ctx, done + step)
            batch = {k: v.to(ctx.device) for k, v in next(batches).items()}
            log = train_step(spec, ddp, batch, loss_fn, opt, sched, ctx.device.type)
            if step % 20 == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in log.items()})
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < st.steps:
                if ctx.is_main:
                    _save_state(state_path, {
                        "fingerprint": fingerprint, "world": ctx.world, "stage": si, "step": step + 1,
                        "epoch": batches.epoch, "offset": batches.offset, "rng": torch.get_rng_state(),
                        "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
                dist.barrier()
        done += st.steps
        del ddp
    train_s = time.perf_counter() - start
    _write_trace(batches, ctx)
    net = plain_batchnorm(net).to("cpu").to(memory_format=torch.contiguous_format)
    net.eval()
    metrics: dict[str, Any] = distributed_evaluate(spec, net, test, ctx)
    record = {
        "metrics": metrics,
        "bar_failures": bar_failures(spec, metrics),
        "fingerprint": fingerprint,
        "steps": sum(st.steps for st in stages),
        "train_seconds": round(train_s, 1),
        "params": sum(p.numel() for p in net.parameters()),
        "host": host_fingerprint(),
        "distributed": {"world_size": ctx.world, "backend": ctx.backend, "global_batch": global_batch,
                        "per_rank_batch": batches.per_rank, "sync_batchnorm_layers": n_bn,
                        "restarts": ctx.restart, "run_id": ctx.run_id,
                        "nodes": int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", 1)) or 1)},
        "weights_sha256_rank0": _digest(net),
    }
    digests: list[Any] = [None] * ctx.world
    dist.all_gather_object(digests, _digest(net))
    record["distributed"]["ranks_identical"] = len(set(digests)) == 1
    if save and ctx.is_main:
        save_checkpoint(spec.name, net, record)
    if ctx.is_main and state_path.exists():  # the job is done: its restart state is not needed any more
        shutil.rmtree(state_path.parent, ignore_errors=True)
    dist.barrier()
    return record


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_resume(path: Path, fingerprint: str, ctx: Context) -> dict[str, Any] | None:
    """The last run state of this job (same torchrun run id), when it is this recipe's."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise DistributedError(f"{path}: run state of another recipe or code (fingerprint "
                               f"{state.get('fingerprint')} != {fingerprint}); start with a new --rdzv-id")
    if state.get("world") != ctx.world:
        raise DistributedError(f"{path}: saved by {state.get('world')} ranks, this job has {ctx.world}; the sampler "
                               "position is per world size: restart with the same world size or a new --rdzv-id")
    if ctx.is_main:
        print(f"resuming {path} at stage {state['stage']} step {state['step']} (restart {ctx.restart})",
              file=sys.stderr, flush=True)
    return state


def _write_trace(batches: ShardedBatches, ctx: Context) -> None:
    folder = os.environ.get(TRACE_DIR)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        out = {"rank": ctx.rank, "world": ctx.world, "epochs": {str(e): ix for e, ix in batches.trace.items()}}
        (Path(folder) / f"rank{ctx.rank}.json").write_text(json.dumps(out))


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first waits for the others: one that tears down gloo
    while its peer is still writing or printing can abort the peer's gloo thread ("terminate called without an
    active exception", exit -6, seen once in CI on two_level's multi-stage run). After an error no rank waits
    (its peers may never reach the barrier; torchrun stops them)."""
    if dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
