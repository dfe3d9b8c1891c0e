"""The one training loop every model uses; model-specific parts come from the spec's recipe."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.checkpoints import checkpoint_path, load_metrics, save_checkpoint
from training.data import make_split
from training.models.common import accuracy, classification_loss
from training.registry import ModelSpec, TrainRecipe, get_spec


def _batches(data: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator):
    n = len(data["label"])
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield {k: torch.from_numpy(v[idx]) for k, v in data.items()}


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, ...]:
    """All outputs of ``model`` over ``images``, concatenated (numpy)."""
    model.eval()
    chunks = [model(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return tuple(np.concatenate([c[k].numpy() for c in chunks]) for k in range(len(chunks[0])))


def evaluate(spec: ModelSpec, model: torch.nn.Module, test: dict[str, np.ndarray]) -> dict[str, float]:
    outputs = predict(model, test["image"])
    logits = outputs[spec.output_names.index(spec.logits_output())]
    metrics = {"accuracy": accuracy(logits, test["label"])}
    if spec.train.metrics is not None:
        metrics.update(spec.train.metrics(outputs, test))
    return metrics


def bar_failures(spec: ModelSpec, metrics: dict[str, float]) -> list[str]:
    failures = []
    if metrics["accuracy"] < spec.checks.min_accuracy:
        failures.append(f"test accuracy {metrics['accuracy']:.4f} < {spec.checks.min_accuracy}")
    if spec.checks.bars is not None:
        failures += spec.checks.bars(metrics)
    return failures


def model_modules(builder: Callable | None) -> list[str]:
    """The modules a model's weights depend on: the one defining ``builder`` plus every model or op module
    (``training.models.*``, ``training.ops.*``) it imports from, e.g. racnn -> racnn, common, ops.crop_zoom.

    Read from the import statements: an imported custom op (a ``CustomOpDef``) does not name its module."""
    if builder is None:
        return []
    home = inspect.getmodule(builder)
    used, packages = set(), ("training.models", "training.ops")
    for node in ast.walk(ast.parse(inspect.getsource(home))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(packages):
            # `from training.ops import crop_zoom` names the submodule training.ops.crop_zoom when there is one
            used |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in sys.modules else node.module
                     for a in node.names}
    return [home.__name__, *sorted(used - {home.__name__})]


def recipe_fingerprint(recipe: TrainRecipe, builder: Callable | None = None) -> str:
    """What the weights depend on: every recipe value, the loss function's source and the source of the
    model's modules (its layers and constants, e.g. RA-CNN's input low-pass; see ``model_modules``).

    Stored beside the checkpoint, so that editing a model or its loss (not only its step count) retrains it.
    """
    values = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name not in ("loss", "metrics")}
    loss = inspect.getsource(recipe.loss) if recipe.loss else "classification_loss"
    model = "".join(inspect.getsource(sys.modules[m]) for m in model_modules(builder))
    return hashlib.sha256((json.dumps(values, sort_keys=True) + loss + model).encode()).hexdigest()[:16]


def train_model(name: str, steps: int | None = None, train_size: int | None = None,
                test_size: int | None = None, save: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train ``name`` with its recipe (overrides are for tests), evaluate, and save the checkpoint."""
    spec = get_spec(name)
    r = spec.train
    steps = steps or r.steps
    torch.manual_seed(r.seed)
    train = make_split("train", train_size or r.train_size, r.canvas, r.seed)
    test = make_split("test", test_size or r.test_size, r.canvas, r.seed)
    model = spec.builder()
    loss_fn = r.loss or classification_loss
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    batches = _batches(train, min(r.batch_size, len(train["label"])), np.random.default_rng(r.seed))
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress, leave=False, mininterval=2)
    for step in bar:
        batch = next(batches)
        loss, log = loss_fn(model(batch["image"]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in log.items()})
    train_s = time.perf_counter() - start
    metrics: dict[str, Any] = evaluate(spec, model, test)
    effective = dataclasses.replace(r, steps=steps, train_size=len(train["label"]), test_size=len(test["label"]))
    metrics.update(steps=steps, recipe=recipe_fingerprint(effective, spec.builder), train_seconds=round(train_s, 1),
                   params=sum(p.numel() for p in model.parameters()))
    metrics["bar_failures"] = bar_failures(spec, metrics)
    if save:
        save_checkpoint(name, model.eval(), metrics)
    return metrics


def ensure_trained(name: str, progress: bool = True) -> dict[str, Any]:
    """Train only when the checkpoint is missing or was trained to another recipe (what `make export` calls)."""
    metrics = load_metrics(name) if checkpoint_path(name).exists() else {}
    spec = get_spec(name)
    if metrics.get("recipe") == recipe_fingerprint(spec.train, spec.builder):
        return metrics
    return train_model(name, progress=progress)
