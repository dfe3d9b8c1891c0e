"""Trained weights in artifacts/: the torch reference every later stage compares against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training import paths
from training.registry import get_spec


class MissingCheckpointError(FileNotFoundError):
    pass


def checkpoint_path(name: str) -> Path:
    return paths.ARTIFACTS_DIR / f"{name}.pt"


def metrics_path(name: str) -> Path:
    return paths.ARTIFACTS_DIR / f"{name}.metrics.json"


def save_checkpoint(name: str, model: nn.Module, metrics: dict[str, Any]) -> Path:
    path = checkpoint_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": name, "state_dict": model.state_dict(), "metrics": metrics}, tmp)
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written checkpoint
    metrics_path(name).write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def load_metrics(name: str) -> dict[str, Any]:
    p = metrics_path(name)
    return json.loads(p.read_text()) if p.exists() else {}


def load_trained(name: str) -> nn.Module:
    """The trained model in eval mode; raises a one-line error if it was never trained."""
    spec = get_spec(name)
    path = checkpoint_path(name)
    if not path.exists():
        raise MissingCheckpointError(
            f"no checkpoint for model {name!r} at {path}; run `make export` (or `python -m training {name}`)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = spec.builder()
        model.load_state_dict(state["state_dict"])
    except Exception as e:  # corrupt or stale file: name it, do not dump a pickle traceback
        raise MissingCheckpointError(f"checkpoint {path} for model {name!r} cannot be loaded: {e}") from e
    return model.eval()
