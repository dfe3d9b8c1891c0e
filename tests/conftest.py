"""Shared fixtures. Trained weights are shipped (training/weights/); exported graphs come from `make export`."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The zoo's tests see the zoo only: models a user derived for their own images (user_models/) stay out of
# every "all models" loop; the user-image tests write theirs to their own folders.
os.environ["ATTNZOO_USER_MODELS"] = tempfile.mkdtemp(prefix="attnzoo-user-models-")


def require_checkpoint(name: str) -> None:
    """Weights are tracked, so a missing checkpoint is a failure, never a skip."""
    from training import checkpoint_path

    if not checkpoint_path(name).exists():
        pytest.fail(f"no shipped checkpoint for {name!r} ({checkpoint_path(name)}); run `python -m training {name}`")


def require_onnx(triton_model: str):
    from training.layout import onnx_path

    p = onnx_path(triton_model)
    if not p.exists():
        pytest.skip(f"no exported graph for {triton_model!r} ({p}); run `make export` first")
    return p
