"""Which TensorRT is here, its errors and logger, and GPU architecture names.

One code path serves full TensorRT (``tensorrt`` 10 or 11) and TensorRT-RTX (``tensorrt_rtx``); the module
is imported lazily, so importing this package costs nothing on a host without either.
"""

from __future__ import annotations

import os
from typing import Any

FLAVOURS = ("tensorrt", "tensorrt_rtx")
PRECISIONS = ("fp32", "fp16", "int8")  # int8: a QDQ graph (export.int8), strongly typed
# Architectures TensorRT-RTX accepts for ahead-of-time builds on a host without a GPU (measured).
AOT_ARCHS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
DEFAULT_AOT_ARCHS = ("sm86",)
WORKSPACE_BYTES = 1 << 30
# TensorRT-RTX logs this on every parse; it is harmless and must not count as a failure.
HARMLESS_MESSAGES = ("Thread context has not been set",)


class TensorRTUnavailableError(RuntimeError):
    """Neither ``tensorrt`` nor ``tensorrt_rtx`` can be imported, or the one present cannot do the job."""


TensorRTUnavailable = TensorRTUnavailableError  # the older name


class TensorRTParseError(RuntimeError):
    """The ONNX parser refused a graph; ``errors`` holds one dict per failing node."""

    def __init__(self, message: str, errors: list[dict[str, Any]]):
        super().__init__(message)
        self.errors = errors


class EngineBuildError(RuntimeError):
    pass


class EngineMismatchError(RuntimeError):
    """An engine was built for another GPU architecture or TensorRT version than the one at hand."""


def import_trt(prefer: str | None = None) -> tuple[Any, str]:
    """Return ``(module, flavour)``. Full TensorRT wins when both are installed (Triton links it);
    ``prefer`` or ``$ATTNZOO_TRT`` (``tensorrt`` | ``tensorrt_rtx``) forces one."""
    prefer = prefer or os.environ.get("ATTNZOO_TRT") or None
    if prefer is not None and prefer not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {prefer!r}; expected one of {FLAVOURS}")
    order = [prefer] if prefer else list(FLAVOURS)
    problems = []
    for name in order:
        try:
            module = __import__(name)
            module.Builder  # noqa: B018 - a broken install can import as an empty namespace package
        except Exception as exc:  # ImportError, or OSError from a missing libnvinfer
            problems.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        return module, name
    raise TensorRTUnavailableError(
        "no usable TensorRT: " + "; ".join(problems)
        + " (pip install tensorrt-rtx-cu13 builds engines ahead of time without a GPU)"
    )


def trt_available(prefer: str | None = None) -> bool:
    try:
        import_trt(prefer)
    except TensorRTUnavailableError:
        return False
    return True


def make_logger(trt: Any, keep_verbose: bool = False) -> Any:
    """A TensorRT logger that records messages instead of printing them (errors are reported in one line).
    ``.errors()`` leaves out the harmless INTERNAL_ERROR every TensorRT-RTX parse logs."""

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity == trt.ILogger.VERBOSE and not keep_verbose:
                return
            self.messages.append((severity.name, msg))

        def errors(self) -> list[str]:
            return [
                m for s, m in self.messages
                if s in ("ERROR", "INTERNAL_ERROR") and not any(h in m for h in HARMLESS_MESSAGES)
            ]

        def warnings(self) -> list[str]:
            return [m for s, m in self.messages if s == "WARNING"]

    return RecordingLogger()


def device_compute_capability() -> str | None:
    """``"9.0"`` for the current CUDA device, or None without one (torch is the probe: always here)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:  # a broken CUDA setup is "no GPU" for our purposes
        pass
    return None


def normalize_cc(cc: Any) -> str:
    """Accept ``"sm86"``, ``"SM86"``, ``"8.6"``, ``86``, ``(8, 6)``; return ``"8.6"``."""
    if isinstance(cc, tuple | list):
        return f"{int(cc[0])}.{int(cc[1])}"
    text = str(cc).strip().lower().removeprefix("sm").removeprefix("_")
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if not text.isdigit() or len(text) < 2:
        raise ValueError(f"cannot read compute capability {cc!r}; write it as sm86 or 8.6")
    return f"{int(text[:-1])}.{int(text[-1])}"


def arch_name(cc: Any) -> str:
    return "sm" + normalize_cc(cc).replace(".", "")


def dtype_name(trt: Any, dtype: Any) -> str:
    """numpy's name for a TensorRT dtype (float32, float16, int64...), as the rest of the repo writes it."""
    try:
        import numpy as np

        return np.dtype(trt.nptype(dtype)).name
    except Exception:  # types numpy lacks (bf16, fp8...)
        return str(dtype).split(".")[-1].lower()


def tensor_info(trt: Any, t: Any) -> dict[str, Any]:
    """``{"name", "shape" (-1 where dynamic), "dtype"}`` of a network tensor."""
    return {"name": t.name, "shape": list(t.shape), "dtype": dtype_name(trt, t.dtype)}
