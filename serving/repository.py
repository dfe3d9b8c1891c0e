"""Generate Triton's ``model_repository/`` from the model specs, for a CPU or a GPU host.

Each model's ``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf from ``spec.inputs``,
``spec.outputs`` and ``spec.serving``, written as text, and parsed back to validate it. No per-model code:
a new registered spec with an exported ``model.onnx`` is served by the same path.

- ``--target cpu``: ``backend: "python"`` with the one generic ``serving/backend/model.py`` (onnxruntime
  inside), because the tritonserver that pip ships (nvidia-pytriton) has only the python backend.
- ``--target gpu``: the native backends of NVIDIA's Triton container: ``platform: "onnxruntime_onnx"``, and a
  ``<name>_trt`` model with ``platform: "tensorrt_plan"`` wherever an engine ``<name>/1/model.plan`` exists.
- either target: a ``<name>_int8`` model, configured like ``<name>``, wherever ``python -m export.int8`` put an
  int8 QDQ graph at ``<name>_int8/1/model.onnx``.

A pass-through model (``passthrough``: Identity, served exactly like the others) measures the fixed
per-request cost of the serving path, so benchmarks can report each model's overhead against that floor.

    python -m serving.repository [--target cpu|gpu] [--repo DIR] [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.cli import cli_error
from serving.modelconfig import (  # config_json, input_*, parse_config: re-exported as this module's API
    RepositoryError,
    add_tensors,
    check_config,
    client_parameters,
    config_json,  # noqa: F401
    config_text,
    copy_file,
    input_bounds,  # noqa: F401
    input_ranges,  # noqa: F401
    parse_config,  # noqa: F401
    set_parameters,
    triton_dtype,
    write_text,
)
from training import layout

if TYPE_CHECKING:
    from training.registry import GraphSpec, ModelSpec, TensorSpec

FLOOR_MODEL = "passthrough"
TRT_SUFFIX = "_trt"
INT8_SUFFIX = layout.INT8_SUFFIX  # "<model>_int8": the int8 QDQ graph (export.int8), same generic backend
VARIANT_SUFFIXES = (TRT_SUFFIX, INT8_SUFFIX)
TARGETS = ("cpu", "gpu")
BACKEND_DIR = Path(__file__).resolve().parent / "backend"
BACKEND_MODEL_PY = BACKEND_DIR / "model.py"  # one graph, onnxruntime inside
BACKEND_PIPELINE_PY = BACKEND_DIR / "pipeline.py"  # BLS: calls the composed graphs' models


# ---------------------------------------------------------------------------------------------- specs


def floor_spec() -> ModelSpec:
    """The pass-through model: same input as every model, Identity graph, same serving options."""
    from training.registry import ModelSpec, TensorSpec, image_input

    image = image_input()
    return ModelSpec(
        name=FLOOR_MODEL,
        family="floor",
        builder=lambda: None,
        description="Identity pass-through: measures the fixed per-request cost of the serving path",
        inputs=(image,),
        outputs=(TensorSpec("output", image.axes, "float32", "image", "the input, unchanged"),),
    )


def spec_for(name: str) -> ModelSpec:
    if name == FLOOR_MODEL:
        return floor_spec()
    from training.registry import get_spec

    return get_spec(name)


@dataclass(frozen=True)
class Deployable:
    """One Triton model of the repository: a graph of a spec, or the model composing a spec's graphs."""

    triton_name: str
    spec: ModelSpec
    graph: GraphSpec | None  # None: the composing (ensemble / BLS) model

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.graph.inputs if self.graph else self.spec.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.graph.outputs if self.graph else self.spec.outputs


def deployables(spec: ModelSpec) -> list[Deployable]:
    """Every Triton model that serves ``spec``: its graphs, then the composing model (if any)."""
    out = [Deployable(spec.graph_model_name(g), spec, g) for g in spec.deploy_graphs()]
    if spec.composition is not None:
        out.append(Deployable(spec.name, spec, None))
    return out


def base_name(triton_name: str) -> str:
    """The deployable a variant model serves: ``cnn_int8`` and ``cnn_trt`` serve ``cnn``."""
    for suffix in VARIANT_SUFFIXES:
        if triton_name.endswith(suffix):
            return triton_name.removesuffix(suffix)
    return triton_name


def find_deployable(triton_name: str, specs: Iterable[ModelSpec]) -> Deployable | None:
    base = base_name(triton_name)
    for spec in specs:
        for d in deployables(spec):
            if d.triton_name == base:
                return d
    return None


# --------------------------------------------------------------------------------------------- config


def graph_config(spec: ModelSpec, graph: GraphSpec | None = None, target: str = "cpu", *,
                 dynamic_batching: bool = True, platform: str | None = None,
                 max_batch_size: int | None = None) -> Any:
    """Triton's ``ModelConfig`` protobuf for one graph of ``spec`` (default: its first / only graph).

    ``platform`` (gpu only) picks ``onnxruntime_onnx`` (default) or ``tensorrt_plan``;
    ``dynamic_batching=False`` gives the same model without the dynamic batcher (benchmarks use it).
    """
    from tritonclient.grpc import model_config_pb2 as mc

    if target not in TARGETS:
        raise RepositoryError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    graph = graph or spec.deploy_graphs()[0]
    so = spec.serving
    mbs = max_batch_size or so.max_batch_size
    cfg = mc.ModelConfig(name=spec.graph_model_name(graph), max_batch_size=mbs)
    if target == "cpu":
        cfg.backend = "python"
    else:
        cfg.platform = platform or "onnxruntime_onnx"
        cfg.default_model_filename = layout.PLAN_FILE if cfg.platform == "tensorrt_plan" else layout.ONNX_FILE
    add_tensors(cfg, graph.inputs, graph.outputs, optional=target == "cpu")
    if dynamic_batching:
        cfg.dynamic_batching.preferred_batch_size.extend(b for b in so.preferred_batch_sizes if b <= mbs)
        cfg.dynamic_batching.max_queue_delay_microseconds = so.max_queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_CPU if target == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.add(count=so.instance_count, kind=kind)
    cfg.version_policy.latest.num_versions = 1
    for batch in sorted({1, max(b for b in (*so.preferred_batch_sizes, 1) if b <= mbs)}):
        w = cfg.model_warmup.add(name=f"batch{batch}_opt", batch_size=batch)
        for t in graph.inputs:
            w.inputs[t.name].data_type = triton_dtype(t.dtype)
            w.inputs[t.name].dims.extend(t.concrete())  # dynamic axes at their opt size (the profile's)
            w.inputs[t.name].zero_data = True  # random_data is random bytes: NaNs in FP32
    # Read by the generic backend (file, threads, bounds) and by clients (how to present each output).
    set_parameters(cfg, {"onnx_file": layout.ONNX_FILE,
                         "intra_op_threads": str(so.intra_op_threads),  # 0: usable cores / instances
                         **client_parameters(spec, graph.inputs, graph.outputs)})
    return cfg


def model_config(spec: ModelSpec, target: str = "cpu", **kw: Any) -> Any:
    """The config of a one-graph model (what the benchmark reconfigures)."""
    return graph_config(spec, None, target, **kw)


def composition_config(spec: ModelSpec, target: str = "cpu", suffix: str = "") -> Any:
    """The model that composes ``spec``'s graphs under the spec's own name: Triton's ensemble scheduler for a
    fixed chain, or the generic BLS python model (``backend/pipeline.py``) for steps that depend on data."""
    from tritonclient.grpc import model_config_pb2 as mc

    comp = spec.composition
    if comp is None:
        raise RepositoryError(f"model {spec.name!r} has no composition")
    graphs = {g.name: g for g in spec.deploy_graphs()}
    cfg = mc.ModelConfig(name=spec.name + suffix, max_batch_size=spec.serving.max_batch_size)
    add_tensors(cfg, spec.inputs, spec.outputs)
    # ``suffix``: a variant's composition calls the same variant of every graph (``_int8`` -> ``<graph>_int8``).
    steps = [{"model": spec.graph_model_name(graphs[s.graph]) + suffix, "input_map": s.input_map,
              "output_map": s.output_map} for s in comp.steps]
    if comp.kind == "ensemble":
        cfg.platform = "ensemble"
        for s in steps:
            step = cfg.ensemble_scheduling.step.add(model_name=s["model"], model_version=-1)
            step.input_map.update(s["input_map"])  # graph tensor -> ensemble tensor
            step.output_map.update(s["output_map"])
    else:
        cfg.backend = "python"
        kind = mc.ModelInstanceGroup.KIND_CPU if target == "cpu" else mc.ModelInstanceGroup.KIND_GPU
        cfg.instance_group.add(count=spec.serving.instance_count, kind=kind)
        set_parameters(cfg, {"steps": json.dumps(steps)})
    set_parameters(cfg, client_parameters(spec, spec.inputs, spec.outputs))
    return cfg


def intra_op_threads(cfg: Any) -> int:
    """The onnxruntime thread count the generic backend will use for ``cfg`` (the one rule, export.runtime)."""
    from export.runtime import intra_op_threads as rule

    instances = sum(g.count or 1 for g in cfg.instance_group) or 1
    return rule(int(cfg.parameters["intra_op_threads"].string_value or 0), instances)


def validate_config(text: str, deployable: Deployable | None = None, source: str = "config.pbtxt") -> Any:
    """Parse with Triton's protobuf and check it agrees with the spec; returns the ``ModelConfig``."""
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = check_config(text, source)

    def fail(msg: str) -> None:
        raise RepositoryError(f"{source}: {msg}")

    if deployable is not None:
        if base_name(cfg.name) != deployable.triton_name:
            fail(f"model name {cfg.name!r} does not match {deployable.triton_name!r}")
        for kind, got, want in (("input", cfg.input, deployable.inputs), ("output", cfg.output, deployable.outputs)):
            got_t = [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in got]
            want_t = [(t.name, mc.DataType.Name(triton_dtype(t.dtype)), list(t.shape)) for t in want]
            if got_t != want_t:
                fail(f"{kind}s {got_t} do not match the spec's {want_t}")
    return cfg


# --------------------------------------------------------------------------------------------- writing


def _write_config(cfg: Any, deployable: Deployable, root: Path) -> Path:
    path = layout.config_path(cfg.name, root)
    text = config_text(cfg)
    validate_config(text, deployable, source=str(path))
    write_text(path, text)
    return path


def write_floor_onnx(path: Path) -> Path:
    """An Identity graph with the image input's signature (dynamic batch, H, W)."""
    import onnx
    from onnx import TensorProto, helper

    spec = floor_spec()
    image = spec.inputs[0]
    dims = ["batch", *[d if d > 0 else f"dim{i}" for i, d in enumerate(image.shape)]]
    graph = helper.make_graph(
        [helper.make_node("Identity", [image.name], [spec.outputs[0].name])],
        FLOOR_MODEL,
        [helper.make_tensor_value_info(image.name, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(spec.outputs[0].name, TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by older onnxruntime builds (e.g. a Triton container's)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _servable_plan(plan: Path) -> bool:
    """Whether Triton's TensorRT backend can load ``plan``: its sidecar must say full TensorRT built it.

    TensorRT-RTX and ahead-of-time engines (``make engines`` on a CPU host) are never served; a plan
    without metadata cannot be vouched for. Either is skipped with a note naming the file.
    """
    if not plan.exists():
        return False
    from export.tensorrt import engine_info_or_none

    info = engine_info_or_none(plan)
    if info is None:
        why = "it has no model.plan.json (architecture and TensorRT version unknown)"
    elif not info.triton_loadable:
        why = f"it is a {info.label}, which Triton's TensorRT backend cannot load"
    else:
        return True
    print(f"serving.repository: {plan} not served as {plan.parent.parent.name}{TRT_SUFFIX}: {why}", file=sys.stderr)
    return False


def _write_composition(spec: ModelSpec, d: Deployable, target: str, root: Path, suffix: str = "") -> list[Path]:
    cfg = composition_config(spec, target, suffix)
    written = [_write_config(cfg, d, root)]
    if cfg.platform == "ensemble":
        layout.version_dir(cfg.name, root).mkdir(parents=True, exist_ok=True)  # Triton requires it
    else:
        written.append(copy_file(BACKEND_PIPELINE_PY, layout.version_dir(cfg.name, root) / layout.BACKEND_FILE))
    return written


def export_manifest(spec: ModelSpec, root: Path) -> dict[str, Any] | None:
    """The export manifest of ``spec`` (``export.manifest``): which variants exist and passed their gates, with
    their checksums. None for the floor model, and for graphs placed by hand without one: those are served as
    fp32 as found (said on stderr), and no other variant of them is ever served."""
    if spec.name == FLOOR_MODEL:
        return None
    from export import manifest

    data = manifest.load(spec.name, root)
    if data is None:
        print(f"serving.repository: model {spec.name!r} has no export manifest "
              f"({manifest.manifest_path(spec.name, root)}): its fp32 graph is served as found, no variant of it",
              file=sys.stderr)
        return None
    if manifest.servable(data, "fp32", root) is None:  # raises when a graph changed since its parity gate
        raise RepositoryError(f"model {spec.name!r}: its fp32 graphs in {root} are missing or did not pass parity "
                              f"(run `python -m export {spec.name}`)")
    return data


def _has_int8(data: dict[str, Any] | None, root: Path) -> bool:
    """The manifest says every int8 graph passed its gate, and the files in the repository are those graphs."""
    from export import manifest

    return data is not None and manifest.servable(data, "int8", root) is not None


VARIANT_CHOICES = ("fp32", "best", "host")
VARIANT_FILE = {"int8": "model.int8.onnx"}  # a default model serving its int8 graph reads this file
STAMP_FILE = "attnzoo.json"  # what generated this repository, for which target: read by the server


def best_variants(reports_dir: Path | None = None) -> dict[str, str]:
    """Model -> the fastest variant that passed its gate at batch 32 (reports/variants.json, ``make variants``)."""
    from training import paths

    p = Path(reports_dir or paths.REPORTS_DIR) / "variants.json"
    if not p.is_file():
        raise RepositoryError(f"--variant best needs {p} (run `make variants`)")
    return {name: r["best"] for name, r in json.loads(p.read_text()).items() if r.get("best")}


def _serve_variant(spec: ModelSpec, d: Deployable, cfg: Any, variant: str, root: Path) -> list[Path]:
    """Point the default model ``cfg`` at its ``variant`` graph (copied beside its fp32 graph); fp32: nothing."""
    if variant not in VARIANT_FILE:
        return []
    src = layout.int8_onnx_path(d.triton_name, repo_dir=root)
    if not src.exists():
        raise RepositoryError(f"model {spec.name!r}: best variant {variant} has no graph at {src}")
    cfg.parameters["onnx_file"].string_value = VARIANT_FILE[variant]
    cfg.parameters["variant"].string_value = variant
    return [copy_file(src, layout.version_dir(d.triton_name, root) / VARIANT_FILE[variant])]


def _set_engine(cfg: Any, served: dict[str, Any] | None) -> None:
    """The CPU engine and threading the host choice measured fastest for this model (python backend only), or
    one per batch size (``parameters.routes``) where engines trade places with it. With OpenVINO's static
    shapes, Triton warms every batch bucket when it loads the model, so the compiles (0.24-0.83 s each,
    measured) happen at load instead of on a user's first request of that size (at the warm-up's sizes)."""
    if served is None:
        return
    from export.cpu_engines import Route
    from export.host_choice import routes_of

    routes = routes_of(served)
    if len(routes) > 1:
        cfg.parameters["routes"].string_value = Route.dump(routes)
    else:
        cfg.parameters["engine"].string_value = served["engine"]
        cfg.parameters["allow_spinning"].string_value = "1" if served["setting"] == "spin on" else "0"
        if served["setting"] in ("static", "dynamic"):  # OpenVINO's shapes (export.host_choice.settings)
            cfg.parameters["shapes"].string_value = served["setting"]
    if any(r.setting == "static" for r in routes):
        _warm_buckets(cfg)
    if served.get("instances"):  # chosen by served measurement on this host (bench.served_threads)
        cfg.instance_group[0].count = served["instances"]


def _warm_buckets(cfg: Any) -> None:
    """The config's warm-up requests (batch 1 and the largest preferred batch, at the inputs' opt sizes:
    ``graph_config``) widened to one per batch bucket (``batch_buckets``)."""
    from export.openvino_runner import batch_buckets

    inputs = cfg.model_warmup[0].inputs
    del cfg.model_warmup[:]
    for b in batch_buckets(cfg.max_batch_size):
        w = cfg.model_warmup.add(name=f"bucket{b}", batch_size=b)
        for name, t in inputs.items():
            w.inputs[name].CopyFrom(t)


def write_model(spec: ModelSpec, target: str = "cpu", repo_dir: str | Path | None = None,
                variant: str = "fp32", choice: dict[str, Any] | None = None) -> list[Path]:
    """Configs for every Triton model of ``spec`` (each graph beside its ``<repo>/<name>/1/model.onnx``, with
    ``model.py`` on cpu; plus the composing model), validated with Triton's protobuf. Where the export manifest
    says every int8 graph passed its gate (and the files are those graphs), the same again as ``<name>_int8``.
    ``choice`` (cpu; ``export.host_choice.choose``): the engine and threading of the fp32 model and of the int8
    one, which is then served only where it measured faster than the fp32 model on this host. Returns the
    files."""
    root = layout.repository_root(repo_dir)
    written: list[Path] = []
    served = (choice or {}).get("served", {})
    data = export_manifest(spec, root)
    int8 = _has_int8(data, root) and (choice is None or served.get("int8") is not None)
    if choice is not None and data is not None:  # the manifest records what this host chose, per instruction set
        from export import manifest

        manifest.amend(spec.name, "host_choice", {**data.get("host_choice", {}), choice["isa_key"]: served}, root)
    for d in deployables(spec):
        if d.graph is None:
            written += _write_composition(spec, d, target, root)
            if int8:
                written += _write_composition(spec, d, target, root, INT8_SUFFIX)
            continue
        onnx_file = layout.onnx_path(d.triton_name, root)
        if spec.name == FLOOR_MODEL and not onnx_file.exists():
            write_floor_onnx(onnx_file)
        if not onnx_file.exists():
            raise RepositoryError(f"model {spec.name!r}: missing {onnx_file} (run `python -m export {spec.name}`)")
        cfg = graph_config(spec, d.graph, target)
        if target == "cpu":  # the default model may serve another variant's graph (--variant best)
            written += _serve_variant(spec, d, cfg, variant, root)
            _set_engine(cfg, served.get("fp32"))
        written.append(_write_config(cfg, d, root))
        if target == "cpu":
            written.append(copy_file(BACKEND_MODEL_PY, layout.version_dir(d.triton_name, root) / layout.BACKEND_FILE))
        if not int8:  # not (or no longer) served: a config left from an earlier generation would load it anyway
            stale = layout.config_path(f"{d.triton_name}{INT8_SUFFIX}", root)
            if stale.exists():
                stale.unlink()
                print(f"serving.repository: {stale.parent.name} not served (its gate or this host's measurement "
                      f"says so); removed its config.pbtxt", file=sys.stderr)
        else:  # the int8 graph, served by the same generic backend under "<name>_int8"
            cfg = graph_config(spec, d.graph, target)
            cfg.name = f"{d.triton_name}{INT8_SUFFIX}"
            if target == "cpu":
                _set_engine(cfg, served.get("int8"))
            written.append(_write_config(cfg, d, root))
            if target == "cpu":
                written.append(copy_file(BACKEND_MODEL_PY, layout.version_dir(cfg.name, root) / layout.BACKEND_FILE))
        plan = layout.plan_path(d.triton_name, root)
        if target == "gpu" and _servable_plan(plan):
            # Triton serves one platform per model: the engine becomes a sibling model "<name>_trt".
            trt_name = f"{d.triton_name}{TRT_SUFFIX}"
            written.append(copy_file(plan, layout.plan_path(trt_name, root)))
            cfg = graph_config(spec, d.graph, target, platform="tensorrt_plan",
                               max_batch_size=min(spec.serving.max_batch_size, spec.export.profile_batch[2]))
            cfg.name = trt_name
            written.append(_write_config(cfg, d, root))
    if spec.name != FLOOR_MODEL:  # every image model also takes encoded files: <name>_image
        from serving.image_models import write_image_models

        written += write_image_models(spec, root)
    return written


def _exported(spec: ModelSpec, root: Path) -> bool:
    return all(layout.onnx_path(spec.graph_model_name(g), root).exists() for g in spec.deploy_graphs())


def write_repository(models: Iterable[str] | None = None, target: str = "cpu",
                     repo_dir: str | Path | None = None, variant: str = "fp32") -> list[Path]:
    """Generate configs for ``models`` (default: every registered model with exported graphs) plus
    the pass-through floor model. Named models without graphs are an error; with ``models=None``
    they are skipped with a note on stderr. ``variant="best"``: each default model serves the fastest variant
    that passed its gate (``make variants``; cpu target). Returns the files written."""
    if variant not in VARIANT_CHOICES:
        raise RepositoryError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANT_CHOICES)}")
    if variant == "host" and target != "cpu":
        raise RepositoryError("--variant host chooses among CPU engines: use it with --target cpu")
    best = best_variants() if variant == "best" else {}
    from training.registry import get_spec, list_models

    root = layout.repository_root(repo_dir)
    if models is None:
        names = [n for n in list_models() if _exported(get_spec(n), root)]
        missing = sorted(set(list_models()) - set(names))
        if missing:
            print(f"serving.repository: not exported yet, skipped: {', '.join(missing)}", file=sys.stderr)
    else:
        names = [n for n in models if n != FLOOR_MODEL]
    written: list[Path] = []
    choices = host_choices(names) if variant == "host" else {}
    for name in [*names, FLOOR_MODEL]:
        written += write_model(spec_for(name), target, root, best.get(name, "fp32"), choices.get(name))
    written.append(write_stamp(root, target, variant, choices))
    return written


def host_choices(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``export.host_choice.choose`` per model: cached per instruction set, measured here when not current."""
    from export.host_choice import choose

    return {n: choose(n) for n in names}


def write_stamp(root: Path, target: str, variant: str, choices: dict[str, dict[str, Any]]) -> Path:
    """``<repo>/attnzoo.json``: the target and selection this repository was generated for, and per model what
    each Triton model serves; the server refuses a repository generated for another target."""
    from training.fingerprint import host_fingerprint

    old = read_stamp(root) or {}
    same = old.get("target") == target and old.get("variant") == variant
    served = {**(old.get("served", {}) if same else {}), **{n: ch["served"] for n, ch in choices.items()}}
    isa_key = old.get("isa_key") if same else None  # a regeneration without choices keeps what it had
    if choices:
        isa_key = next(iter(choices.values()))["isa_key"]
    stamp = {"generator": "serving.repository", "target": target, "variant": variant, "isa_key": isa_key,
             "host": host_fingerprint().get("cpu"), "served": served}
    path = root / STAMP_FILE
    write_text(path, json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    return path


def read_stamp(repo_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The repository's stamp (``write_stamp``), or None for a repository this generator did not write."""
    path = layout.repository_root(repo_dir) / STAMP_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RepositoryError(f"{path}: not JSON ({e})") from None


def stamped_choices(repo_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Per model, what the stamp says each variant is served with (``{"fp32": {engine, setting, instances, ...},
    "int8": ... or None}``); {} for an unstamped repository."""
    return (read_stamp(repo_dir) or {}).get("served") or {}


def served_models(repo_dir: str | Path | None = None) -> list[str]:
    """Model directories that have a config.pbtxt (what the server loads)."""
    root = layout.repository_root(repo_dir)
    return sorted(p.parent.name for p in root.glob(f"*/{layout.CONFIG_FILE}"))


def check_repository(repo_dir: str | Path | None = None) -> list[str]:
    """Validate every config.pbtxt in the repository against its spec; returns the model names."""
    from training.registry import get_spec, list_models

    root = layout.repository_root(repo_dir)
    specs = [floor_spec(), *(get_spec(n) for n in list_models())]
    names = served_models(root)
    for name in names:
        path = layout.config_path(name, root)
        d = find_deployable(name, specs)
        if d is None and name.endswith((layout.IMAGE_SUFFIX, layout.PREPROCESS_SUFFIX)):
            base = name.removesuffix(layout.IMAGE_SUFFIX).removesuffix(layout.PREPROCESS_SUFFIX)
            if any(s.name == base for s in specs):  # generated from the spec: its tensors checked there
                validate_config(path.read_text(), None, source=str(path))
                continue
        if d is None:
            raise RepositoryError(f"{path}: no registered model serves {name!r}")
        validate_config(path.read_text(), d, source=str(path))
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.repository", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="models to generate (default: every exported model)")
    p.add_argument("--target", choices=TARGETS, default="cpu",
                   help="cpu: python backend + onnxruntime (pip's tritonserver); gpu: native backends")
    p.add_argument("--repo", type=Path, default=None, help="repository folder (default: model_repository/)")
    p.add_argument("--variant", choices=VARIANT_CHOICES, default="fp32",
                   help="host: each model's engine and threading chosen by measurement on this host, and its int8 "
                        "model served only where it measured faster here (export.host_choice; cpu target); "
                        "best: each default model serves its fastest gated variant (reports/variants.json)")
    p.add_argument("--check", action="store_true", help="only validate the existing configs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.models:
        from training.cli import model_names

        if model_names([m for m in args.models if m != FLOOR_MODEL] or ["all"]) is None:
            return 2  # an unknown model: one line, the exit status of every command
    try:
        if args.check:
            names = check_repository(args.repo)
            print(f"{len(names)} valid model configs: {', '.join(names)}")
        else:
            for path in write_repository(args.models or None, args.target, args.repo, args.variant):
                print(path)
    except Exception as e:
        return cli_error(e, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
