"""Shipped trained weights (``training/weights/``): the torch reference every later stage compares against.

Per model: ``<name>.pt`` (the state dict) and ``<name>.json`` (test metrics, the weights fingerprint, the
host that trained them and the checksum of the ``.pt``). Both are tracked, so a fresh clone exports and
serves without training; ``ensure_trained`` retrains only a model whose fingerprint no longer matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from training import paths
from training.registry import get_spec


class MissingCheckpointError(FileNotFoundError):
    pass


def weights_dir(name: str) -> Path:
    """``training/weights/`` for the zoo; ``user_models/`` for a model derived for a user's images."""
    from training.derived import spec_path

    return paths.USER_MODELS_DIR if spec_path(name).exists() else paths.WEIGHTS_DIR


def checkpoint_path(name: str) -> Path:
    return weights_dir(name) / f"{name}.pt"


def record_path(name: str) -> Path:
    return weights_dir(name) / f"{name}.json"


def file_sha256(path: str | Path) -> str:
    """A file's sha256, read in 1 MiB blocks (graphs and engines can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(name: str, model: Any, record: dict[str, Any]) -> Path:
    """Write the weights and their record; the record gets the weights' checksum."""
    import torch

    path = checkpoint_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written checkpoint
    record = {"model": name, **record, "sha256": file_sha256(path)}
    record_path(name).write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_record(name: str) -> dict[str, Any]:
    """The shipped record ({} when there is none): ``metrics``, ``fingerprint``, ``host``, ``sha256``."""
    p = record_path(name)
    return json.loads(p.read_text()) if p.exists() else {}


def load_metrics(name: str) -> dict[str, Any]:
    return load_record(name).get("metrics", {})


def load_trained(name: str) -> Any:
    """The trained model in eval mode; raises a one-line error if it was never trained."""
    import torch

    spec = get_spec(name)
    path = checkpoint_path(name)
    if not path.exists():
        raise MissingCheckpointError(
            f"no checkpoint for model {name!r} at {path}; run `make export` (or `python -m training {name}`)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = spec.builder()
        model.load_state_dict(state)
    except Exception as e:  # corrupt or stale file: name it, do not dump a pickle traceback
        raise MissingCheckpointError(f"checkpoint {path} for model {name!r} cannot be loaded: {e}") from e
    return model.eval()
