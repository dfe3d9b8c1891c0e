"""Every path an artifact lives at, in one place (stdlib only: the client and the server import it).

Triton's repository: ``<repo>/<triton model>/config.pbtxt`` and ``<repo>/<triton model>/<version>/<file>``;
a deployable of several graphs has one Triton model per graph (``ModelSpec.graph_model_name``) plus the
composing model under the spec's own name. Build outputs that Triton does not serve go to ``artifacts/``.
"""

from __future__ import annotations

from pathlib import Path

from training import paths

VERSION = "1"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
CONFIG_FILE = "config.pbtxt"
BACKEND_FILE = "model.py"
IMAGE_SUFFIX = "_image"  # "<model>_image": encoded image files in (serving.image_models)
PREPROCESS_SUFFIX = "_preprocess"  # its first step: decode + the eval transform


def repository_root(repo_dir: str | Path | None = None) -> Path:
    return Path(repo_dir) if repo_dir is not None else paths.REPOSITORY_DIR


def model_dir(triton_model: str, repo_dir: str | Path | None = None) -> Path:
    return repository_root(repo_dir) / triton_model


def version_dir(triton_model: str, repo_dir: str | Path | None = None) -> Path:
    return model_dir(triton_model, repo_dir) / VERSION


def onnx_path(triton_model: str, repo_dir: str | Path | None = None) -> Path:
    """The served FP32 graph of one Triton model."""
    return version_dir(triton_model, repo_dir) / ONNX_FILE


def plan_path(triton_model: str, repo_dir: str | Path | None = None) -> Path:
    return version_dir(triton_model, repo_dir) / PLAN_FILE


def config_path(triton_model: str, repo_dir: str | Path | None = None) -> Path:
    return model_dir(triton_model, repo_dir) / CONFIG_FILE


def custom_ops_onnx_path(triton_model: str) -> Path:
    """Custom-op graphs need runtime kernels, so they stay out of the repository."""
    return paths.ARTIFACTS_DIR / "onnx" / f"{triton_model}.custom_ops.onnx"


def fp16_onnx_path(triton_model: str) -> Path:
    return paths.ARTIFACTS_DIR / "onnx" / f"{triton_model}.fp16.onnx"


INT8_SUFFIX = "_int8"  # the Triton model serving a graph's int8 variant: "<triton model>_int8"


def int8_onnx_path(triton_model: str, flavour: str = "cpu", repo_dir: str | Path | None = None) -> Path:
    """The QDQ int8 graph (``export.int8``): ``cpu`` is served, so it lives in the repository as the model
    ``<triton model>_int8``; ``tensorrt`` (symmetric, float bias) is the one TensorRT parses, a build product."""
    if flavour == "cpu":
        return onnx_path(f"{triton_model}{INT8_SUFFIX}", repo_dir)
    return paths.ARTIFACTS_DIR / "onnx" / f"{triton_model}.int8.{flavour}.onnx"


def int8_work_dir(triton_model: str) -> Path:
    """Intermediate int8 build products: the pre-processed graph, calibration caches."""
    return paths.ARTIFACTS_DIR / "int8" / triton_model


def engine_dir(triton_model: str, root: str | Path | None = None) -> Path:
    """Ahead-of-time and per-precision engines: ``<root>/<model>/<precision>/model.plan``."""
    return Path(root or paths.ARTIFACTS_DIR / "engines") / triton_model


def timing_cache_path(tag: str) -> Path:
    return paths.ARTIFACTS_DIR / "engines" / f"timing-{tag}.cache"
