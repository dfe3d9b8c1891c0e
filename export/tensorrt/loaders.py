"""Polygraphy-style loaders: small callables, composed lazily, each doing one step of an engine build.

    network = NetworkFromOnnxPath("model.onnx")                      # parse (errors name node and op)
    config = CreateConfig(profiles=profile_shapes(graph, batch), archs=("sm86",))  # precision, profile, archs
    info = SaveEngine(EngineBytesFromNetwork(network, config), "model.plan", model="cnn")()  # plan + sidecar

Nothing runs until the outermost loader is called; a loader takes either a value or another loader
(Polygraphy's ``invoke_if_callable``), and whoever calls a loader owns what it returns (a network built
inside ``EngineBytesFromNetwork`` is released there). ``parse_onnx`` and ``build_engine`` are thin
compositions of these.

- FP32 engines are built with TF32 off, so that engine-vs-torch parity measures TensorRT, not TF32.
- FP16 engines come from an FP16-typed ONNX graph (``export.fp16.convert_to_fp16``) built as a strongly
  typed network ("graph" style): the ops kept in fp32 stay fp32 through the graph's Casts. TensorRT-RTX and
  TensorRT 11 only support this; TensorRT 10 also has the older "flag" style (``BuilderFlag.FP16`` on the
  FP32 graph, kept ops pinned to fp32 per layer).
- TensorRT-RTX builds engines ahead of time (AOT) without a GPU for chosen architectures (SM80/86/89/
  120/121; not SM90). Such engines are labelled ``aot`` and are not loadable by Triton's TensorRT backend
  (which links full TensorRT). Timing caches are used where they do something (full TensorRT only).
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from export.tensorrt.engine_info import (
    EngineInfo,
    check_engine_compatible,
    sha256,
    write_engine_info,
)
from export.tensorrt.library import (
    DEFAULT_AOT_ARCHS,
    PRECISIONS,
    WORKSPACE_BYTES,
    EngineBuildError,
    EngineMismatchError,
    TensorRTParseError,
    TensorRTUnavailableError,
    arch_name,
    device_compute_capability,
    import_trt,
    make_logger,
    normalize_cc,
    tensor_info,
)
from export.tensorrt.profiles import ProfileError, ProfileShapes, check_network_inputs, profile_dict, profile_shapes
from training import layout

FP16_STYLES = ("graph", "flag")


def invoke_if_callable(value: Any, *args: Any) -> Any:
    """A loader's argument is a value or a loader: call the loader (lazily, now), pass a value through."""
    return value(*args) if callable(value) else value


# --------------------------------------------------------------------------------------------- network


class ParsedNetwork:
    """A parsed TensorRT network and what keeps it alive (builder, parser, logger). Use it as a context
    manager, or call ``close()``: the network dies with its builder, and TensorRT-RTX segfaulted when the
    network handed to the parser was not held."""

    def __init__(self, trt: Any, flavour: str, logger: Any, builder: Any, network: Any, parser: Any,
                 path: Path, seconds: float, strongly_typed: bool) -> None:
        self.trt, self.flavour, self.logger = trt, flavour, logger
        self.builder, self.network, self.parser = builder, network, parser
        self.path, self.seconds, self.strongly_typed = path, seconds, strongly_typed

    @property
    def trt_version(self) -> str:
        return self.trt.__version__

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Input name -> shape, -1 where dynamic."""
        return {t.name: tuple(t.shape) for t in (self.network.get_input(i) for i in range(self.network.num_inputs))}

    def inputs(self) -> list[dict[str, Any]]:
        return [tensor_info(self.trt, self.network.get_input(i)) for i in range(self.network.num_inputs)]

    def outputs(self) -> list[dict[str, Any]]:
        return [tensor_info(self.trt, self.network.get_output(i)) for i in range(self.network.num_outputs)]

    def layer_precisions(self) -> dict[str, dict[str, Any]]:
        """Layer name -> {type, input dtypes, output dtypes}, as TensorRT types the network."""
        layers = {}
        for i in range(self.network.num_layers):
            layer = self.network.get_layer(i)
            ins = [layer.get_input(j) for j in range(layer.num_inputs)]
            layers[layer.name] = {
                "type": str(layer.type).split(".")[-1],
                "inputs": [str(t.dtype).split(".")[-1] for t in ins if t is not None],
                "outputs": [str(layer.get_output(j).dtype).split(".")[-1] for j in range(layer.num_outputs)],
            }
        return layers

    def close(self) -> None:
        self.parser = None  # parser first: it refers to the network, which refers to the builder
        self.network = None
        self.builder = None

    def __enter__(self) -> ParsedNetwork:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def network_flags(trt: Any, strongly_typed: bool) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def parser_error(err: Any) -> dict[str, Any]:
    """One parser error as a dict: node index, node name, operator, code, description."""
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


def parse_message(path: Path, version: str, errors: list[dict[str, Any]], logged: list[str]) -> str:
    if not errors:
        detail = "; ".join(logged[-2:]) or "no error was reported"
        return f"{path}: TensorRT {version} cannot parse the graph: {detail}"
    parts = []
    for e in errors:
        if e["node_index"] is not None and e["node_index"] >= 0:
            where = f"node {e['node_name'] or '#' + str(e['node_index'])!r} (op {e['operator'] or '?'})"
        else:
            where = "the graph"
        parts.append(f"{where}: {e['desc']} [{e['code']}]")
    return f"{path}: TensorRT {version} cannot import " + "; ".join(parts)


class NetworkFromOnnxPath:
    """Loader: parse an ONNX file into a fresh network -> ``ParsedNetwork``. A node TensorRT cannot import
    raises ``TensorRTParseError`` naming each such node (name, operator, description)."""

    def __init__(self, path: str | Path, strongly_typed: bool = True, prefer: str | None = None,
                 keep_verbose: bool = False) -> None:
        self.path, self.strongly_typed = Path(path), strongly_typed
        self.prefer, self.keep_verbose = prefer, keep_verbose

    def __call__(self) -> ParsedNetwork:
        trt, flavour = import_trt(self.prefer)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX graph {self.path} does not exist (run `make export` first)")
        logger = make_logger(trt, self.keep_verbose)
        start = time.perf_counter()
        try:
            builder = trt.Builder(logger)
        except Exception as exc:  # full TensorRT without a CUDA device
            raise TensorRTUnavailableError(f"TensorRT builder cannot start here: {exc}") from exc
        if builder is None:
            raise TensorRTUnavailableError(
                "TensorRT builder cannot start here (full TensorRT needs a CUDA GPU; TensorRT-RTX does not)"
            )
        network = builder.create_network(network_flags(trt, self.strongly_typed))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.path)):
            errors = [parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise TensorRTParseError(parse_message(self.path, trt.__version__, errors, logger.errors()), errors)
        allow_attention_decomposition(trt, network)
        return ParsedNetwork(trt, flavour, logger, builder, network, parser, self.path,
                             time.perf_counter() - start, self.strongly_typed)


def allow_attention_decomposition(trt: Any, network: Any) -> int:
    """Mark every parsed ONNX ``Attention`` (opset 23, export/rewriters/fused_attention.py) decomposable: TensorRT's
    fused attention kernels cover some shapes and precisions only (fp32: none, measured with TensorRT-RTX 1.7:
    "Attention operation was not supported by a dedicated kernel"), and a decomposable one is built from its
    MatMul/Softmax parts where no kernel fits instead of failing the build. Returns how many were marked."""
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if kind is None:  # a TensorRT without the attention layer parses no Attention node either
        return 0
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer  # TensorRT's python API downcasts by class assignment
            layer.attention.decomposable = True
            marked += 1
    return marked


# --------------------------------------------------------------------------------------------- config


@dataclass
class EngineConfig:
    """A builder config and what it commits the engine to (recorded in the sidecar)."""

    config: Any
    precision: str
    fp16_style: str | None
    compute_capabilities: list[str]
    aot: bool
    profiles: ProfileShapes
    kept_fp32_ops: list[str] = field(default_factory=list)
    timing_cache: Path | None = None
    device_cc: str | None = None


def pin_fp32_layers(trt: Any, network: Any, onnx_path: Path, keep_ops: tuple[str, ...]) -> int:
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


class CreateConfig:
    """Loader: ``(ParsedNetwork) -> EngineConfig``.

    - precision: strongly typed (the graph's types decide), or TensorRT 10's FP16 flag; TF32 off;
    - one optimization profile: ``profiles`` is ``profile_shapes(...)``, or a loader taking the network's
      input shapes (``partial(profile_shapes, graph, batch)``); either is checked against the network;
    - target architectures: ``archs`` are TensorRT-RTX ahead-of-time targets; None: the GPU at hand, else
      ``DEFAULT_AOT_ARCHS``;
    - timing cache: True: the layout's per-flavour file, a path: that file, False: none (full TensorRT only:
      TensorRT-RTX's are no-ops).
    """

    def __init__(self, precision: str = "fp32", fp16_style: str | None = None,
                 profiles: ProfileShapes | Callable[[dict[str, tuple[int, ...]]], ProfileShapes] | None = None,
                 archs: tuple[str, ...] | list[str] | None = None, timing_cache: bool | str | Path = True,
                 keep_fp32_ops: tuple[str, ...] = (), workspace_bytes: int = WORKSPACE_BYTES) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        style = None if precision != "fp16" else (fp16_style or "graph")  # fp32, int8: the graph's types decide
        if style is not None and style not in FP16_STYLES:
            raise ValueError(f"unknown fp16_style {fp16_style!r}; expected 'graph' or 'flag'")
        self.precision, self.fp16_style, self.profiles = precision, style, profiles
        self.archs = tuple(archs) if archs else None
        self.timing_cache, self.keep_fp32_ops = timing_cache, tuple(keep_fp32_ops)
        self.workspace_bytes = workspace_bytes

    def __call__(self, net: ParsedNetwork) -> EngineConfig:
        trt = net.trt
        if self.fp16_style == "flag":
            if not hasattr(trt.BuilderFlag, "FP16"):
                raise EngineBuildError(f"{net.flavour} {trt.__version__} is strongly typed only (no "
                                       "BuilderFlag.FP16): use fp16_style='graph'")
            if net.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
                raise EngineBuildError("fp16_style='flag' needs a network parsed with strongly_typed=False")
        cfg = net.builder.create_builder_config()
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if hasattr(trt.BuilderFlag, "TF32"):
            cfg.clear_flag(trt.BuilderFlag.TF32)  # parity: fp32 means fp32, not TF32 matmuls
        if self.fp16_style == "flag":
            cfg.set_flag(trt.BuilderFlag.FP16)
            cfg.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            pin_fp32_layers(trt, net.network, net.path, self.keep_fp32_ops)
        profiles = self._profile(net, cfg)
        device_cc = device_compute_capability()
        ccs, aot = self._archs(trt, cfg, device_cc)
        cache = self._timing_cache(net, cfg, ccs[0])
        return EngineConfig(cfg, self.precision, self.fp16_style, ccs, aot, profiles,
                            list(self.keep_fp32_ops) if self.precision == "fp16" else [], cache, device_cc)

    def _profile(self, net: ParsedNetwork, cfg: Any) -> ProfileShapes:
        shapes = net.input_shapes()
        try:
            profiles = invoke_if_callable(self.profiles, shapes)
            if profiles is None:
                dynamic = [n for n, s in shapes.items() if any(d < 0 for d in s)]
                if dynamic:
                    raise ProfileError(f"inputs {dynamic} are dynamic, and no profile was given")
                return {}
            check_network_inputs(profiles, shapes)
        except ProfileError as exc:
            raise ProfileError(f"{net.path}: {exc}") from None
        prof = net.builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            if any(d < 0 for d in shapes[name]):  # static inputs need no entry
                prof.set_shape(name, lo, opt, hi)
        cfg.add_optimization_profile(prof)
        return profiles

    def _archs(self, trt: Any, cfg: Any, device_cc: str | None) -> tuple[list[str], bool]:
        """Set the target architectures. Returns (compute capabilities as "8.6", aot)."""
        archs = self.archs
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

    def _timing_cache(self, net: ParsedNetwork, cfg: Any, cc: str) -> Path | None:
        if not self.timing_cache or net.flavour != "tensorrt":  # TensorRT-RTX: timing caches are no-ops
            return None
        if self.timing_cache is True:
            path = layout.timing_cache_path(f"{net.flavour}-{net.trt_version}-{arch_name(cc)}")
        else:
            path = Path(self.timing_cache)
        data = path.read_bytes() if path.is_file() else b""
        cfg.set_timing_cache(cfg.create_timing_cache(data), False)
        return path


# --------------------------------------------------------------------------------------------- engine


@dataclass
class BuiltEngine:
    """A serialized engine and everything its sidecar records about the build."""

    serialized: bytes
    flavour: str
    trt_version: str
    settings: EngineConfig  # with ``config`` released
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    source: Path  # the graph that was parsed
    seconds: float  # parse + build


class EngineBytesFromNetwork:
    """Loader: build a serialized engine from a network (``ParsedNetwork`` or its loader) and a config
    (``EngineConfig`` or a loader taking the network) -> ``BuiltEngine``. Writes the timing cache back."""

    def __init__(self, network: ParsedNetwork | Callable[[], ParsedNetwork],
                 config: EngineConfig | Callable[[ParsedNetwork], EngineConfig]) -> None:
        self.network, self.config = network, config

    def __call__(self) -> BuiltEngine:
        net = invoke_if_callable(self.network)
        owned = net is not self.network
        try:
            start = time.perf_counter()
            settings = invoke_if_callable(self.config, net)
            serialized = net.builder.build_serialized_network(net.network, settings.config)
            if serialized is None:
                detail = "; ".join(net.logger.errors()[-3:]) or "no error was logged"
                raise EngineBuildError(
                    f"{net.path}: TensorRT {net.trt_version} could not build a {settings.precision} engine: {detail}"
                )
            seconds = net.seconds + time.perf_counter() - start
            if settings.timing_cache is not None:
                settings.timing_cache.parent.mkdir(parents=True, exist_ok=True)
                settings.timing_cache.write_bytes(memoryview(settings.config.get_timing_cache().serialize()))
            return BuiltEngine(bytes(memoryview(serialized)), net.flavour, net.trt_version,
                               replace(settings, config=None), net.inputs(), net.outputs(), net.path, seconds)
        finally:
            if owned:
                net.close()


class SaveEngine:
    """Loader: write a built engine (``BuiltEngine`` or its loader) to ``path`` (atomically: never a
    half-written plan under the final name) and its ``<path>.json`` sidecar -> ``EngineInfo``.
    ``onnx`` is the graph to record (default: the one parsed), ``model`` the Triton model serving it."""

    def __init__(self, engine: BuiltEngine | Callable[[], BuiltEngine], path: str | Path, model: str,
                 onnx: str | Path | None = None, graph: str | None = None) -> None:
        self.engine, self.path, self.model, self.onnx, self.graph = engine, Path(path), model, onnx, graph

    def __call__(self) -> EngineInfo:
        built = invoke_if_callable(self.engine)
        s = built.settings
        out = self.path
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_plan = out.with_name(out.name + ".tmp")
        tmp_plan.write_bytes(built.serialized)
        tmp_plan.replace(out)
        source = Path(self.onnx) if self.onnx is not None else built.source
        info = EngineInfo(
            model=self.model,
            plan=str(out),
            precision=s.precision,
            flavour=built.flavour,
            trt_version=built.trt_version,
            compute_capabilities=s.compute_capabilities,
            aot=s.aot,
            triton_loadable=built.flavour == "tensorrt",
            profile=profile_dict(s.profiles),
            inputs=built.inputs,
            outputs=built.outputs,
            onnx=str(source),
            onnx_sha256=sha256(source),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            build_seconds=round(built.seconds, 4),
            plan_bytes=out.stat().st_size,
            plan_sha256=sha256(out),
            fp16_style=s.fp16_style,
            kept_fp32_ops=s.kept_fp32_ops,
            tf32=False,
            timing_cache=str(s.timing_cache) if s.timing_cache else None,
            built_on={"host": platform.node(), "device_cc": s.device_cc},
            graph=self.graph,
        )
        write_engine_info(info, out)
        return info


# --------------------------------------------------------------------------------------------- compositions


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


def onnx_ops(onnx_path: str | Path) -> dict[str, int]:
    """Op type -> count of the graph's nodes."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def parse_onnx(path: str | Path, prefer: str | None = None) -> ParseReport:
    """Parse one graph with the installed TensorRT; raise ``TensorRTParseError`` naming each node
    (name, operator, description) that TensorRT cannot import."""
    with NetworkFromOnnxPath(path, prefer=prefer)() as net:
        return ParseReport(
            path=str(path), flavour=net.flavour, trt_version=net.trt_version, seconds=net.seconds,
            num_layers=net.network.num_layers, inputs=net.inputs(), outputs=net.outputs(),
            onnx_ops=onnx_ops(path), warnings=net.logger.warnings(),
        )


def network_layer_precisions(path: str | Path, prefer: str | None = None) -> dict[str, dict[str, Any]]:
    """Layer name -> {type, input dtypes, output dtypes} as TensorRT types the parsed network. Layers are
    named after ONNX nodes, so this shows whether a node kept in fp32 really reaches TensorRT as fp32."""
    with NetworkFromOnnxPath(path, prefer=prefer)() as net:
        return net.layer_precisions()


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


def is_qdq_graph(onnx_path: str | Path) -> bool:
    """True when the graph has QuantizeLinear nodes (explicit quantization: TensorRT takes int8 from them)."""
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def spec_graph(spec: Any, graph: Any = None) -> Any:
    """``graph`` (a ``GraphSpec`` or a graph name) of ``spec``, or its only deploy graph."""
    graphs = spec.deploy_graphs()
    if graph is None:
        if len(graphs) != 1:
            raise ValueError(f"model {spec.name!r} has graphs {[g.name for g in graphs]}: say which (graph=...)")
        return graphs[0]
    if isinstance(graph, str):
        found = [g for g in graphs if g.name == graph]
        if not found:
            raise ValueError(f"model {spec.name!r} has no graph {graph!r}; it has {[g.name for g in graphs]}")
        return found[0]
    return graph


def build_engine(
    onnx_path: str | Path,
    spec: Any,
    out_path: str | Path,
    archs: tuple[str, ...] | list[str] | None = None,
    precision: str = "fp32",
    fp16_style: str = "graph",
    timing_cache: bool | str | Path = True,
    prefer: str | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
    graph: Any = None,
) -> EngineInfo:
    """Build ``out_path`` (a ``.plan``) from the ONNX graph of ``graph`` (default: the spec's only graph),
    plus its ``.plan.json`` sidecar. The profile comes from the graph's named inputs and
    ``spec.export.profile_batch``.

    ``precision="fp16"`` takes an FP16 graph (``export.fp16.convert_to_fp16``); an FP32 graph is
    converted on the fly with ``spec.export.fp16_keep_fp32_ops`` ("graph" style), or, with
    ``fp16_style="flag"`` on TensorRT <= 10, built with BuilderFlag.FP16 and the kept ops pinned to fp32.
    ``archs`` (``("sm86", "sm89")``) are TensorRT-RTX ahead-of-time targets; None builds for the GPU at
    hand, or for ``DEFAULT_AOT_ARCHS`` when there is none.
    """
    if fp16_style not in FP16_STYLES:
        raise ValueError(f"unknown fp16_style {fp16_style!r}; expected 'graph' or 'flag'")
    keep = tuple(spec.export.fp16_keep_fp32_ops)
    g = spec_graph(spec, graph)
    profile_shapes(g, spec.export.profile_batch)  # refuses a bad spec before any work
    profiles = partial(profile_shapes, g, spec.export.profile_batch)  # checked against the parsed graph
    config = CreateConfig(precision, fp16_style, profiles, archs, timing_cache, keep, workspace_bytes)
    trt, _ = import_trt(prefer)
    style = config.fp16_style
    onnx_path = Path(onnx_path)
    if style == "flag" and not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineBuildError(f"TensorRT {trt.__version__} is strongly typed only (no BuilderFlag.FP16): "
                               "use fp16_style='graph'")
    with tempfile.TemporaryDirectory() as tmp:
        source = onnx_path
        if precision == "fp16" and style == "graph" and not is_fp16_graph(onnx_path):
            from export.fp16 import convert_to_fp16

            source = convert_to_fp16(onnx_path, Path(tmp) / "model.fp16.onnx", keep)
        elif precision == "int8" and not is_qdq_graph(onnx_path):
            raise EngineBuildError(f"{onnx_path}: an int8 engine takes a QDQ graph (python -m export.int8)")
        elif precision == "fp32" and is_fp16_graph(onnx_path):
            raise EngineBuildError(f"{onnx_path}: an FP16 graph cannot make an fp32 engine; pass the FP32 graph")
        elif style == "flag" and is_fp16_graph(onnx_path):
            raise EngineBuildError(f"{onnx_path}: fp16_style='flag' takes the FP32 graph, not an FP16 one")
        network = NetworkFromOnnxPath(source, strongly_typed=style != "flag", prefer=prefer)
        engine = EngineBytesFromNetwork(network, config)
        return SaveEngine(engine, out_path, model=spec.graph_model_name(g), onnx=onnx_path, graph=g.name)()


def load_engine(plan_path: str | Path, prefer: str | None = None) -> tuple[Any, Any, EngineInfo]:
    """Check the sidecar against this host, then deserialize. Returns (runtime, engine, info); keep the
    runtime alive as long as the engine. Needs a GPU."""
    trt, flavour = import_trt(prefer)
    device_cc = device_compute_capability()
    if device_cc is None:
        raise TensorRTUnavailableError(f"{plan_path}: running a TensorRT engine needs a CUDA GPU, and none is visible")
    info = check_engine_compatible(plan_path, device_cc, trt.__version__, flavour)
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        detail = "; ".join(logger.errors()[-2:]) or "no error was logged"
        raise EngineMismatchError(f"{plan_path}: TensorRT {trt.__version__} refused the engine: {detail}")
    return runtime, engine, info
