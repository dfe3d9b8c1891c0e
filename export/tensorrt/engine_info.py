"""What an engine is tied to: the JSON sidecar ``<plan>.json`` beside every plan, and the checks that read it.

An engine runs only with the TensorRT flavour and version that built it, on the GPU architectures it was
built for, and only for input shapes inside its optimization profile. The sidecar records all three, so a
mismatch is refused in one line before TensorRT is asked to deserialize anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.tensorrt.library import EngineMismatchError, arch_name, normalize_cc
from export.tensorrt.profiles import outside_profile
from training.checkpoints import file_sha256 as sha256  # noqa: F401 (re-exported: the one implementation)

METADATA_FORMAT = 1


@dataclass
class EngineInfo:
    """Everything an engine is tied to; written as ``<plan>.json`` beside the plan."""

    model: str  # the Triton model that serves the graph (``spec.graph_model_name(graph)``)
    plan: str
    precision: str
    flavour: str
    trt_version: str
    compute_capabilities: list[str]  # "8.6", ...
    aot: bool  # built ahead of time without the target GPU (TensorRT-RTX on a CPU host)
    triton_loadable: bool  # Triton's TensorRT backend links full TensorRT, never TensorRT-RTX
    profile: dict[str, dict[str, list[int]]]  # input name -> {"min", "opt", "max"} shapes, batch included
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    onnx: str
    onnx_sha256: str
    built_at: str
    build_seconds: float
    plan_bytes: int
    plan_sha256: str
    fp16_style: str | None = None  # "graph" (FP16-typed ONNX) | "flag" (BuilderFlag.FP16, TensorRT <= 10)
    kept_fp32_ops: list[str] = field(default_factory=list)
    tf32: bool = False
    timing_cache: str | None = None
    built_on: dict[str, Any] = field(default_factory=dict)
    graph: str | None = None  # the spec's graph name
    format: int = METADATA_FORMAT

    @property
    def label(self) -> str:
        archs = ",".join(arch_name(c) for c in self.compute_capabilities)
        kind = "ahead-of-time" if self.aot else "on-device"
        return f"{self.precision} {self.flavour} {self.trt_version} {kind} build for {archs}"

    def shape_problems(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """One message per input shape (batch included) the engine's profile does not cover; empty if all fit."""
        return outside_profile(self.profile, shapes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineInfo:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def metadata_path(plan_path: str | Path) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def read_engine_info(plan_path: str | Path) -> EngineInfo:
    """The sidecar of ``plan_path``; ``EngineMismatchError`` (one line) when there is none."""
    meta = metadata_path(plan_path)
    if not meta.is_file():
        raise EngineMismatchError(
            f"{plan_path}: no {meta.name} beside the engine, so its GPU architecture and TensorRT version "
            "are unknown; rebuild it with `make engines`"
        )
    return EngineInfo.from_dict(json.loads(meta.read_text()))


def engine_info_or_none(plan_path: str | Path) -> EngineInfo | None:
    """The sidecar of ``plan_path``, or None when the plan or its sidecar is missing or unreadable (an engine
    without metadata cannot be vouched for). The repository generator writes ``platform: "tensorrt_plan"``
    only for an engine whose info says ``triton_loadable`` (full TensorRT built it)."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        return None
    try:
        return read_engine_info(plan_path)
    except (EngineMismatchError, ValueError, TypeError):  # no sidecar, bad JSON, or fields missing
        return None


def write_engine_info(info: EngineInfo, plan_path: str | Path | None = None) -> Path:
    path = metadata_path(plan_path or info.plan)
    path.write_text(info.to_json())
    return path


def check_engine_compatible(
    plan_path: str | Path,
    device_cc: Any,
    trt_version: str,
    flavour: str | None = None,
) -> EngineInfo:
    """Return the engine's metadata, or raise ``EngineMismatchError`` in one line when this engine
    cannot run on a GPU of ``device_cc`` with TensorRT ``trt_version`` (engines are not portable
    across TensorRT versions, and run only on the architectures they were built for)."""
    info = read_engine_info(plan_path)
    cc = normalize_cc(device_cc)
    problems = []
    if flavour is not None and info.flavour != flavour:
        problems.append(f"it was built by {info.flavour}, this runtime is {flavour}")
    if info.trt_version != trt_version:
        problems.append(f"it was built by TensorRT {info.trt_version}, this runtime is {trt_version}")
    if cc not in info.compute_capabilities:
        built = ", ".join(arch_name(c) for c in info.compute_capabilities)
        problems.append(f"it targets {built}, this GPU is {arch_name(cc)}")
    if problems:
        raise EngineMismatchError(
            f"{plan_path} ({info.model}, {info.precision}) cannot run here: {'; '.join(problems)}; "
            "rebuild it on this host with `make engines`"
        )
    return info
