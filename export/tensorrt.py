"""TensorRT: parse ONNX graphs, build serialized engines, and record what each engine is tied to.

One code path over the TensorRT Python API serves full TensorRT (``tensorrt`` 10 or 11) and
TensorRT-RTX (``tensorrt_rtx``), whichever is installed:

- FP32 engines are built with TF32 off, so that engine-vs-torch parity measures TensorRT, not TF32.
- FP16 engines come from an FP16-typed ONNX graph (``export.fp16.convert_to_fp16``) built as a
  strongly typed network ("graph" style): the ops kept in fp32 stay fp32 through the graph's Casts.
  TensorRT-RTX and TensorRT 11 only support this. TensorRT 10 also has the older "flag" style
  (``BuilderFlag.FP16`` on the FP32 graph, kept ops pinned to fp32 per layer); ``fp16_style="flag"``
  selects it where the library still has the flag.
- An engine is tied to the TensorRT flavour/version and GPU architecture that built it. Both go to a
  JSON sidecar (``model.plan.json``) and ``check_engine_compatible`` refuses a mismatch in one line.

TensorRT-RTX builds engines ahead of time (AOT) without a GPU for chosen architectures (SM80/86/89/
120/121; not SM90). Such engines are labelled ``aot`` and are not loadable by Triton's TensorRT
backend (which links full TensorRT): they prove the graphs build, they are not H100 deployments.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.paths import ARTIFACTS_DIR, REPOSITORY_DIR

FLAVOURS = ("tensorrt", "tensorrt_rtx")
PRECISIONS = ("fp32", "fp16")
PLAN_NAME = "model.plan"
METADATA_FORMAT = 1
# Architectures TensorRT-RTX accepts for ahead-of-time builds on a host without a GPU (measured).
AOT_ARCHS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
DEFAULT_AOT_ARCHS = ("sm86",)
WORKSPACE_BYTES = 1 << 30
# TensorRT-RTX logs this on every parse; it is harmless and must not count as a failure.
_HARMLESS = ("Thread context has not been set",)


class TensorRTUnavailableError(RuntimeError):
    """Neither ``tensorrt`` nor ``tensorrt_rtx`` can be imported, or the one present cannot do the job."""


TensorRTUnavailable = TensorRTUnavailableError  # the name export.pipeline imports


class TensorRTParseError(RuntimeError):
    """The ONNX parser refused a graph; ``errors`` holds one dict per failing node."""

    def __init__(self, message: str, errors: list[dict[str, Any]]):
        super().__init__(message)
        self.errors = errors


class EngineBuildError(RuntimeError):
    pass


class EngineMismatchError(RuntimeError):
    """An engine was built for another GPU architecture or TensorRT version than the one at hand."""


# --------------------------------------------------------------------------------------------- library


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


def _logger(trt: Any, keep_verbose: bool = False) -> Any:
    """A logger that records messages instead of printing them (errors are reported in one line)."""

    class _Recorder(trt.ILogger):
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
                if s in ("ERROR", "INTERNAL_ERROR") and not any(h in m for h in _HARMLESS)
            ]

    return _Recorder()


def _network_flags(trt: Any, strongly_typed: bool) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


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


# --------------------------------------------------------------------------------------------- parse


@dataclass
class ParseReport:
    path: str
    flavour: str
    trt_version: str
    seconds: float
    num_layers: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    onnx_ops: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.trt_version

    def summary(self) -> str:
        ins = ", ".join(f"{t['name']}{t['shape']}:{t['dtype']}" for t in self.inputs)
        return (
            f"{Path(self.path).name}: {self.num_layers} layers parsed by {self.flavour} {self.trt_version} "
            f"in {self.seconds * 1e3:.1f} ms (inputs {ins})"
        )


def _parse(trt: Any, logger: Any, onnx_path: Path, strongly_typed: bool = True) -> tuple[Any, Any, Any]:
    """Parse into a fresh network; returns (builder, network, parser). The caller must keep all three
    alive: the network dies with its builder, and TensorRT-RTX segfaulted when it was not held."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX graph {onnx_path} does not exist (run `make export` first)")
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # full TensorRT without a CUDA device
        raise TensorRTUnavailableError(f"TensorRT builder cannot start here: {exc}") from exc
    if builder is None:
        raise TensorRTUnavailableError(
            "TensorRT builder cannot start here (full TensorRT needs a CUDA GPU; TensorRT-RTX does not)"
        )
    network = builder.create_network(_network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTParseError(_parse_message(onnx_path, trt, errors, logger), errors)
    return builder, network, parser


def _parser_error(err: Any) -> dict[str, Any]:
    def get(attr: str, default: Any = None) -> Any:
        fn = getattr(err, attr, None)  # node_name/node_operator are missing in old TensorRT releases
        try:
            return fn() if fn is not None else default
        except Exception:
            return default

    return {
        "node_index": get("node", -1),
        "node_name": get("node_name", "") or "",
        "operator": get("node_operator", "") or "",
        "code": str(get("code", "")).split(".")[-1],
        "desc": str(get("desc", "")).strip(),
    }


def _parse_message(path: Path, trt: Any, errors: list[dict[str, Any]], logger: Any) -> str:
    version = getattr(trt, "__version__", "?")
    if not errors:
        detail = "; ".join(logger.errors()[-2:]) or "no error was reported"
        return f"{path}: TensorRT {version} cannot parse the graph: {detail}"
    parts = []
    for e in errors:
        if e["node_index"] is not None and e["node_index"] >= 0:
            where = f"node {e['node_name'] or '#' + str(e['node_index'])!r} (op {e['operator'] or '?'})"
        else:
            where = "the graph"
        parts.append(f"{where}: {e['desc']} [{e['code']}]")
    return f"{path}: TensorRT {version} cannot import " + "; ".join(parts)


def _onnx_ops(onnx_path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _dtype_name(trt: Any, dtype: Any) -> str:
    """numpy's name for a TensorRT dtype (float32, float16, int64...), as the rest of the repo writes it."""
    try:
        import numpy as np

        return np.dtype(trt.nptype(dtype)).name
    except Exception:  # types numpy lacks (bf16, fp8...)
        return str(dtype).split(".")[-1].lower()


def _tensor_info(trt: Any, t: Any) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape), "dtype": _dtype_name(trt, t.dtype)}


def parse_onnx(path: str | Path, prefer: str | None = None) -> ParseReport:
    """Parse one graph with the installed TensorRT; raise ``TensorRTParseError`` naming each node
    (name, operator, description) that TensorRT cannot import."""
    trt, flavour = import_trt(prefer)
    logger = _logger(trt)
    start = time.perf_counter()
    builder, network, parser = _parse(trt, logger, Path(path))
    seconds = time.perf_counter() - start
    report = ParseReport(
        path=str(path),
        flavour=flavour,
        trt_version=trt.__version__,
        seconds=seconds,
        num_layers=network.num_layers,
        inputs=[_tensor_info(trt, network.get_input(i)) for i in range(network.num_inputs)],
        outputs=[_tensor_info(trt, network.get_output(i)) for i in range(network.num_outputs)],
        onnx_ops=_onnx_ops(Path(path)),
        warnings=[m for s, m in logger.messages if s == "WARNING"],
    )
    del parser, network, builder  # parser first: it refers to the network
    return report


def network_layer_precisions(path: str | Path, prefer: str | None = None) -> dict[str, dict[str, Any]]:
    """Layer name -> {type, input dtypes, output dtypes} as TensorRT types the parsed network. Layers are
    named after ONNX nodes, so this shows whether a node kept in fp32 really reaches TensorRT as fp32."""
    trt, _ = import_trt(prefer)
    logger = _logger(trt)
    builder, network, parser = _parse(trt, logger, Path(path))
    layers = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        ins = [layer.get_input(j) for j in range(layer.num_inputs)]
        layers[layer.name] = {
            "type": str(layer.type).split(".")[-1],
            "inputs": [str(t.dtype).split(".")[-1] for t in ins if t is not None],
            "outputs": [str(layer.get_output(j).dtype).split(".")[-1] for j in range(layer.num_outputs)],
        }
    del parser, network, builder
    return layers


# --------------------------------------------------------------------------------------------- profile


Shape = tuple[int, ...]


def profile_shapes(spec: Any, input_shapes: dict[str, Shape]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) per dynamic network input, from ``spec.export.profile_batch`` (axis 0) and
    ``spec.export.profile_side`` (the H and W axes of the image input, when dynamic).

    ``input_shapes`` are the network's input shapes with -1 for dynamic axes. An input with a dynamic
    axis the spec gives no range for is an error: TensorRT would refuse it later, less clearly."""
    batch = tuple(spec.export.profile_batch)
    side = tuple(spec.export.profile_side)
    if not (batch[0] <= batch[1] <= batch[2] and side[0] <= side[1] <= side[2]):
        raise ValueError(f"model {spec.name!r}: profile ranges must be ordered min <= opt <= max")
    image = spec.input.name
    profiles: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, shape in input_shapes.items():
        if all(d >= 0 for d in shape):
            continue  # static input: no profile entry needed
        dims: list[tuple[int, int, int]] = []
        for axis, d in enumerate(shape):
            if d >= 0:
                dims.append((d, d, d))
            elif axis == 0:
                dims.append(batch)
            elif name == image and len(shape) == 4 and axis in (2, 3):
                dims.append(side)
            else:
                raise ValueError(
                    f"model {spec.name!r}: input {name!r} axis {axis} of shape {list(shape)} is dynamic "
                    "but the spec gives no range for it (only the batch and the image's H, W have one)"
                )
        profiles[name] = tuple(tuple(d[k] for d in dims) for k in range(3))  # type: ignore[assignment]
    return profiles


# --------------------------------------------------------------------------------------------- engines


@dataclass
class EngineInfo:
    """Everything an engine is tied to; written as ``<plan>.json`` beside the plan."""

    model: str
    plan: str
    precision: str
    flavour: str
    trt_version: str
    compute_capabilities: list[str]  # "8.6", ...
    aot: bool  # built ahead of time without the target GPU (TensorRT-RTX on a CPU host)
    triton_loadable: bool  # Triton's TensorRT backend links full TensorRT, never TensorRT-RTX
    profile: dict[str, dict[str, list[int]]]
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
    format: int = METADATA_FORMAT

    @property
    def label(self) -> str:
        archs = ",".join(arch_name(c) for c in self.compute_capabilities)
        kind = "ahead-of-time" if self.aot else "on-device"
        return f"{self.precision} {self.flavour} {self.trt_version} {kind} build for {archs}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def metadata_path(plan_path: str | Path) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def read_engine_info(plan_path: str | Path) -> EngineInfo:
    meta = metadata_path(plan_path)
    if not meta.is_file():
        raise EngineMismatchError(
            f"{plan_path}: no {meta.name} beside the engine, so its GPU architecture and TensorRT version "
            "are unknown; rebuild it with `make engines`"
        )
    return EngineInfo.from_dict(json.loads(meta.read_text()))


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_fp16_graph(onnx_path: str | Path) -> bool:
    """True when the graph already computes in fp16 (has fp16 weights or casts to fp16)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    fp16 = onnx.TensorProto.FLOAT16
    if any(t.data_type == fp16 for t in model.graph.initializer):
        return True
    for node in model.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute):
            return True
    return False


def _set_archs(trt: Any, cfg: Any, archs: tuple[str, ...] | None, device_cc: str | None) -> tuple[list[str], bool]:
    """Pick the target architectures. Returns (compute capabilities as "8.6", aot)."""
    can_target = hasattr(cfg, "num_compute_capabilities") and hasattr(trt, "ComputeCapability")
    if not can_target:  # full TensorRT: always builds for the GPU it runs on
        if device_cc is None:
            raise TensorRTUnavailableError("full TensorRT builds only on a CUDA GPU, and none is visible")
        if archs and any(normalize_cc(a) != device_cc for a in archs):
            raise EngineBuildError(
                f"full TensorRT builds for this GPU (compute capability {device_cc}) only, not for "
                f"{', '.join(archs)}; use TensorRT-RTX for ahead-of-time builds"
            )
        return [device_cc], False
    if not archs:
        if device_cc is not None:  # RTX on a GPU host: build for the GPU at hand
            cfg.num_compute_capabilities = 1
            cfg.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
            return [device_cc], False
        archs = DEFAULT_AOT_ARCHS
    ccs = [normalize_cc(a) for a in archs]
    members = trt.ComputeCapability.__members__
    cfg.num_compute_capabilities = len(ccs)
    for i, cc in enumerate(ccs):
        member = arch_name(cc).upper()
        if member not in members:
            offered = ", ".join(m.lower() for m in members if m.startswith("SM"))
            raise EngineBuildError(
                f"TensorRT-RTX {trt.__version__} cannot target {arch_name(cc)} (offers {offered}; "
                "SM90/H100 is not among them)"
            )
        cfg.set_compute_capability(members[member], i)
    return ccs, device_cc is None or ccs != [device_cc]


def _timing_cache_path(flavour: str, version: str, cc: str) -> Path:
    return ARTIFACTS_DIR / "engines" / f"timing-{flavour}-{version}-{arch_name(cc)}.cache"


def _pin_fp32_layers(trt: Any, network: Any, onnx_path: Path, keep_ops: tuple[str, ...]) -> int:
    """FP16 'flag' style (TensorRT <= 10): pin the layers of the kept ONNX ops to fp32."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {n.name for n in model.graph.node if n.op_type in keep_ops}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in names:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(
    onnx_path: str | Path,
    spec: Any,
    out_path: str | Path,
    archs: tuple[str, ...] | list[str] | None = None,
    precision: str = "fp32",
    fp16_style: str = "graph",
    timing_cache: bool = True,
    prefer: str | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> EngineInfo:
    """Build ``out_path`` (a ``.plan``) from an ONNX graph, plus its ``.plan.json`` sidecar.

    ``precision="fp16"`` takes an FP16 graph (``export.fp16.convert_to_fp16``); an FP32 graph is
    converted on the fly with ``spec.export.fp16_keep_fp32_ops`` ("graph" style), or, with
    ``fp16_style="flag"`` on TensorRT <= 10, built with BuilderFlag.FP16 and the kept ops pinned to fp32.
    ``archs`` (``("sm86", "sm89")``) are TensorRT-RTX ahead-of-time targets; None builds for the GPU at
    hand, or for ``DEFAULT_AOT_ARCHS`` when there is none.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if fp16_style not in ("graph", "flag"):
        raise ValueError(f"unknown fp16_style {fp16_style!r}; expected 'graph' or 'flag'")
    trt, flavour = import_trt(prefer)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    keep = tuple(spec.export.fp16_keep_fp32_ops)
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    if precision == "fp16" and fp16_style == "flag" and not has_fp16_flag:
        raise EngineBuildError(
            f"{flavour} {trt.__version__} is strongly typed only (no BuilderFlag.FP16): use fp16_style='graph'"
        )
    style = None if precision == "fp32" else fp16_style
    source_graph = onnx_path
    with tempfile.TemporaryDirectory() as tmp:
        graph = onnx_path
        if precision == "fp16" and style == "graph" and not is_fp16_graph(onnx_path):
            from export.fp16 import convert_to_fp16

            graph = convert_to_fp16(onnx_path, Path(tmp) / "model.fp16.onnx", keep)
        elif precision == "fp32" and is_fp16_graph(onnx_path):
            raise EngineBuildError(f"{onnx_path}: an FP16 graph cannot make an fp32 engine; pass the FP32 graph")
        elif precision == "fp16" and style == "flag" and is_fp16_graph(onnx_path):
            raise EngineBuildError(f"{onnx_path}: fp16_style='flag' takes the FP32 graph, not an FP16 one")
        logger = _logger(trt)
        start = time.perf_counter()
        builder, network, parser = _parse(trt, logger, graph, strongly_typed=(style != "flag"))
        cfg = builder.create_builder_config()
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if hasattr(trt.BuilderFlag, "TF32"):
            cfg.clear_flag(trt.BuilderFlag.TF32)  # parity: fp32 means fp32, not TF32 matmuls
        if style == "flag":
            cfg.set_flag(trt.BuilderFlag.FP16)
            cfg.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            _pin_fp32_layers(trt, network, graph, keep)

        inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
        shapes = profile_shapes(spec, inputs)
        if shapes:
            prof = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                prof.set_shape(name, lo, opt, hi)
            cfg.add_optimization_profile(prof)

        device_cc = device_compute_capability()
        ccs, aot = _set_archs(trt, cfg, tuple(archs) if archs else None, device_cc)

        cache_file = None
        if timing_cache and flavour == "tensorrt":  # TensorRT-RTX: timing caches are no-ops
            cache_file = _timing_cache_path(flavour, trt.__version__, ccs[0])
            data = cache_file.read_bytes() if cache_file.is_file() else b""
            cfg.set_timing_cache(cfg.create_timing_cache(data), False)

        serialized = builder.build_serialized_network(network, cfg)
        if serialized is None:
            detail = "; ".join(logger.errors()[-3:]) or "no error was logged"
            raise EngineBuildError(
                f"{graph}: TensorRT {trt.__version__} could not build a {precision} engine: {detail}"
            )
        seconds = time.perf_counter() - start
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_bytes(memoryview(cfg.get_timing_cache().serialize()))

        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_plan = out_path.with_name(out_path.name + ".tmp")
        tmp_plan.write_bytes(memoryview(serialized))
        tmp_plan.replace(out_path)  # never leave a half-written plan under the final name
        info = EngineInfo(
            model=spec.name,
            plan=str(out_path),
            precision=precision,
            flavour=flavour,
            trt_version=trt.__version__,
            compute_capabilities=ccs,
            aot=aot,
            triton_loadable=flavour == "tensorrt",
            profile={n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()},
            inputs=[_tensor_info(trt, network.get_input(i)) for i in range(network.num_inputs)],
            outputs=[_tensor_info(trt, network.get_output(i)) for i in range(network.num_outputs)],
            onnx=str(source_graph),
            onnx_sha256=sha256(source_graph),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            build_seconds=round(seconds, 4),
            plan_bytes=out_path.stat().st_size,
            plan_sha256=sha256(out_path),
            fp16_style=style,
            kept_fp32_ops=list(keep) if precision == "fp16" else [],
            tf32=False,
            timing_cache=str(cache_file) if cache_file else None,
            built_on={"host": platform.node(), "device_cc": device_cc},
        )
        del parser, network, builder
    metadata_path(out_path).write_text(info.to_json())
    return info


# --------------------------------------------------------------------------------------------- loading


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


def load_engine(plan_path: str | Path, prefer: str | None = None) -> tuple[Any, Any, EngineInfo]:
    """Check the sidecar against this host, then deserialize. Returns (runtime, engine, info); keep the
    runtime alive as long as the engine. Needs a GPU."""
    trt, flavour = import_trt(prefer)
    device_cc = device_compute_capability()
    if device_cc is None:
        raise TensorRTUnavailableError(f"{plan_path}: running a TensorRT engine needs a CUDA GPU, and none is visible")
    info = check_engine_compatible(plan_path, device_cc, trt.__version__, flavour)
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        detail = "; ".join(logger.errors()[-2:]) or "no error was logged"
        raise EngineMismatchError(f"{plan_path}: TensorRT {trt.__version__} refused the engine: {detail}")
    return runtime, engine, info


# --------------------------------------------------------------------------------------------- repository


def repository_plan_path(model: str, repo_dir: str | Path | None = None, version: int = 1) -> Path:
    return Path(repo_dir or REPOSITORY_DIR) / model / str(version) / PLAN_NAME


def repository_plan(model: str, repo_dir: str | Path | None = None, version: int = 1) -> EngineInfo | None:
    """The engine in ``model_repository/<model>/<version>/model.plan`` and its metadata, or None.

    For the GPU-target config generator: write ``platform: "tensorrt_plan"`` only when this returns
    an engine with ``triton_loadable`` true (full TensorRT); TensorRT-RTX or AOT engines never go there.
    """
    plan = repository_plan_path(model, repo_dir, version)
    if not plan.is_file():
        return None
    try:
        return read_engine_info(plan)
    except EngineMismatchError:
        return None  # a plan without metadata cannot be vouched for


def aot_engine_dir(model: str, root: str | Path | None = None) -> Path:
    """Where ahead-of-time builds go: never into the model repository (they are not deployments)."""
    return Path(root or ARTIFACTS_DIR / "engines") / model
