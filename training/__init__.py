"""Models, data and training: the first stage of the pipeline.

Names are resolved lazily (PEP 562), so ``import training`` (and the client and repository generator that
read specs) loads no torch until a model is built.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MissingCheckpointError": "training.checkpoints",
    "checkpoint_path": "training.checkpoints",
    "load_trained": "training.checkpoints",
    "ModelSpec": "training.registry",
    "create_model": "training.registry",
    "get_spec": "training.registry",
    "list_models": "training.registry",
    "register_model": "training.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
