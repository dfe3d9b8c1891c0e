"""Shared fixtures. Tests that need trained checkpoints skip with a reason when `make export` has not run."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def require_checkpoint(name: str) -> None:
    from training import checkpoint_path

    if not checkpoint_path(name).exists():
        pytest.skip(f"no trained checkpoint for {name!r} ({checkpoint_path(name)}); run `make export` first")


def require_onnx(name: str):
    from export.pipeline import onnx_path

    p = onnx_path(name)
    if not p.exists():
        pytest.skip(f"no exported graph for {name!r} ({p}); run `make export` first")
    return p
