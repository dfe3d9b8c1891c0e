"""The one training loop every model uses; model-specific parts come from the spec's task and recipe."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.checkpoints import checkpoint_path, load_record, save_checkpoint
from training.datasets import split_for
from training.fingerprint import host_fingerprint, weights_fingerprint
from training.registry import ModelSpec, Stage, TensorSpec, TrainRecipe, get_spec


def _batches(data: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator):
    n = len(data["label"])
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield {k: torch.from_numpy(v[idx]) for k, v in data.items()}


def forward(spec: ModelSpec, model: torch.nn.Module, feeds: dict[str, Any]) -> dict[str, Any]:
    """Run ``model`` on named inputs and name its outputs: the spec's order is the model's argument order."""
    outs = model(*(feeds[t.name] for t in spec.inputs))
    return dict(zip(spec.output_names, outs, strict=True))


def training_forward(spec: ModelSpec, model: torch.nn.Module, feeds: dict[str, Any]) -> dict[str, Any]:
    """What a loss sees: the named outputs, plus auxiliary ones (e.g. deep supervision's per-scale logits) when
    the model defines ``training_outputs(*inputs) -> dict`` (never exported: serving sees ``forward``)."""
    extra = getattr(model, "training_outputs", None)
    if extra is None:
        return forward(spec, model, feeds)
    return extra(*(feeds[t.name] for t in spec.inputs))


def data_feeds(spec: ModelSpec, data: dict[str, Any]) -> dict[str, Any]:
    """The model's named inputs from a data split's arrays (each input names its array in ``data``)."""
    missing = [t.name for t in spec.inputs if not t.optional and (t.data is None or t.data not in data)]
    if missing:
        raise ValueError(f"model {spec.name!r}: inputs {missing} have no array in the data ({sorted(data)})")
    like = next(iter(data.values()))
    return {t.name: data[t.data] if t.data is not None and t.data in data else _default(t, like)
            for t in spec.inputs}


def _default(t: TensorSpec, like: Any) -> Any:
    """An optional input's default for as many samples as ``like`` holds, as the server feeds it (numpy or
    torch, like the data)."""
    a = t.default_batch(len(like))
    return torch.from_numpy(a) if isinstance(like, torch.Tensor) else a


@torch.no_grad()
def predict(spec: ModelSpec, model: torch.nn.Module, data: dict[str, np.ndarray],
            batch_size: int = 256) -> dict[str, np.ndarray]:
    """All named outputs of ``model`` over a data split, concatenated (numpy)."""
    model.eval()
    feeds = data_feeds(spec, data)
    n = len(next(iter(feeds.values())))
    chunks = [forward(spec, model, {k: torch.from_numpy(v[i : i + batch_size]) for k, v in feeds.items()})
              for i in range(0, n, batch_size)]
    return {k: np.concatenate([c[k].numpy() for c in chunks]) for k in spec.output_names}


def evaluate(spec: ModelSpec, model: torch.nn.Module, test: dict[str, np.ndarray]) -> dict[str, float]:
    outputs = predict(spec, model, test)
    metrics = spec.task.metrics(outputs, test)
    if spec.train.metrics is not None:
        metrics.update(spec.train.metrics(outputs, test))
    return metrics


def bar_failures(spec: ModelSpec, metrics: dict[str, float]) -> list[str]:
    failures = spec.task.bars(metrics)
    if spec.checks.bars is not None:
        failures += spec.checks.bars(metrics)
    return failures


def plan_stages(r: TrainRecipe, steps: int | None) -> list[Stage]:
    """The recipe's stages (one plain stage without them); a ``steps`` override scales each stage."""
    stages = list(r.stages) or [Stage("train", r.steps)]
    if steps is None:
        return stages
    total = sum(st.steps for st in stages)
    return [dataclasses.replace(st, steps=max(1, round(st.steps * steps / total))) for st in stages]


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def stage_parameters(stage: Stage, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a stage trains: its ``params`` pick, or all of the model's."""
    return stage.params(model) if stage.params is not None else list(model.parameters())


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a linear warm-up (5% of ``steps``) and a cosine decay to zero over ``steps``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    return opt, sched


def _run_stage(spec: ModelSpec, model: torch.nn.Module, stage: Stage, lr: float, weight_decay: float,
               loss_fn: Any, batches: Any, desc: str, progress: bool, groups: Any = None) -> None:
    """AdamW with a linear warm-up (5%) and a cosine decay over the stage's steps, in the recipe's precision."""
    if spec.train.precision not in PRECISIONS:
        raise ValueError(f"model {spec.name!r}: unknown training precision {spec.train.precision!r}; "
                         f"expected one of {sorted(PRECISIONS)}")
    steps = stage.steps
    params = stage_parameters(stage, model)
    opt, sched = make_optimizer(groups(model, params, lr) if groups else params, lr, weight_decay, steps)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=2)
    for step in bar:
        log = train_step(spec, lambda feeds: training_forward(spec, model, feeds), next(batches), loss_fn, opt,
                         sched)
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in log.items()})


def train_step(spec: ModelSpec, forward: Any, batch: dict[str, torch.Tensor], loss_fn: Any,
               opt: torch.optim.Optimizer, sched: Any, device_type: str = "cpu") -> dict[str, float]:
    """One optimizer step on ``batch`` in the recipe's precision and memory format (the one-process loop and every
    DDP rank alike); ``forward(feeds)`` runs the model. Returns the loss's log."""
    low = PRECISIONS[spec.train.precision]
    fmt = torch.channels_last if spec.train.channels_last else torch.contiguous_format
    feeds = {k: v.contiguous(memory_format=fmt) if v.dim() == 4 else v for k, v in data_feeds(spec, batch).items()}
    with torch.autocast(device_type, dtype=low or torch.bfloat16, enabled=low is not None):
        loss, log = loss_fn(forward(feeds), batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return log


def prepare(spec: ModelSpec, steps: int | None, train_size: int | None, test_size: int | None,
            initializer: Any = None) -> tuple[dict, dict, torch.nn.Module, Any, list]:
    """What every training run starts from, in this order (the seed first, so every process builds the same
    model): the data splits, the model (its starting weights from ``initializer``; channels-last where the recipe
    says), the optimizer's parameter groups the initializer returns, and the recipe's stages."""
    r = spec.train
    torch.manual_seed(r.seed)
    train = split_for(spec, "train", train_size or r.train_size)
    test = split_for(spec, "test", test_size or r.test_size)
    model = spec.builder()
    groups = initializer(model) if initializer is not None else None
    if r.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return train, test, model, groups, plan_stages(r, steps)


def train_model(model: str | ModelSpec, steps: int | None = None, train_size: int | None = None,
                test_size: int | None = None, save: bool = True, progress: bool = True,
                initializer: Any = None) -> dict[str, Any]:
    """Train a registered model (by name) or any spec (a study's variant) with its recipe (overrides are for
    tests), evaluate, and save the checkpoint unless ``save`` is False. ``initializer(model)`` (fine-tuning,
    training.finetune) loads starting weights into the built model and may return a function
    ``(model, params, lr) -> parameter groups`` for the optimizer.

    Returns the record saved beside the weights: ``metrics``, ``bar_failures``, ``fingerprint``, ``host``."""
    spec = model if isinstance(model, ModelSpec) else get_spec(model)
    name = spec.name
    r = spec.train
    train, test, model, groups, stages = prepare(spec, steps, train_size, test_size, initializer)
    batches = _batches(train, min(r.batch_size, len(train["label"])), np.random.default_rng(r.seed))
    start = time.perf_counter()
    for st in stages:
        if st.setup is not None:
            st.setup(model, train)
        _run_stage(spec, model, st, r.lr if st.lr is None else st.lr, r.weight_decay,
                   st.loss or r.loss or spec.task.loss, batches,
                   desc=f"train {name}" + (f" [{st.name}]" if len(stages) > 1 else ""), progress=progress,
                   groups=groups)
    train_s = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format)  # what export and the checkpoint see
    metrics: dict[str, Any] = evaluate(spec, model, test)
    record = {
        "metrics": metrics,
        "bar_failures": bar_failures(spec, metrics),
        "fingerprint": weights_fingerprint(spec, steps, len(train["label"]), len(test["label"])),
        "steps": sum(st.steps for st in stages),
        "train_seconds": round(train_s, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "host": host_fingerprint(),
    }
    if save:
        save_checkpoint(name, model.eval(), record)
    return record


def is_current(name: str) -> bool:
    """Whether the shipped checkpoint was trained from the current code and recipe."""
    spec = get_spec(name)
    return checkpoint_path(name).exists() and load_record(name).get("fingerprint") == weights_fingerprint(spec)


def ensure_trained(name: str, progress: bool = True) -> dict[str, Any]:
    """Train only when the checkpoint is missing or stale (what `make export` calls); returns its record."""
    if is_current(name):
        return load_record(name)
    return train_model(name, progress=progress)
