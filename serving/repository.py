"""Generate Triton's ``model_repository/`` from the model specs, for a CPU or a GPU host.

Each model's ``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf from ``spec.inputs``,
``spec.outputs`` and ``spec.serving``, written as text, and parsed back to validate it. No per-model code:
a new registered spec with an exported ``model.onnx`` is served by the same path.

- ``--target cpu``: ``backend: "python"`` with the one generic ``serving/backend/model.py`` (onnxruntime
  inside), because the tritonserver that pip ships (nvidia-pytriton) has only the python backend.
- ``--target gpu``: the native backends of NVIDIA's Triton container: ``platform: "onnxruntime_onnx"``, and a
  ``<name>_trt`` model with ``platform: "tensorrt_plan"`` wherever an engine ``<name>/1/model.plan`` exists.

A pass-through model (``passthrough``: Identity, served exactly like the others) measures the fixed
per-request cost of the serving path, so benchmarks can report each model's overhead against that floor.

    python -m serving.repository [--target cpu|gpu] [--repo DIR] [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.cli import cli_error

if TYPE_CHECKING:
    from training.registry import ModelSpec, TensorSpec

VERSION = "1"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
FLOOR_MODEL = "passthrough"
TRT_SUFFIX = "_trt"
TARGETS = ("cpu", "gpu")
BACKEND_MODEL_PY = Path(__file__).resolve().parent / "backend" / "model.py"


class RepositoryError(RuntimeError):
    """A one-line problem with the repository (missing graph, invalid config)."""


# ---------------------------------------------------------------------------------------------- specs


def floor_spec() -> ModelSpec:
    """The pass-through model: same input as every model, Identity graph, same serving options."""
    from torch import nn

    from training.registry import ModelSpec, TensorSpec, image_input

    return ModelSpec(
        name=FLOOR_MODEL,
        family="floor",
        builder=nn.Identity,
        description="Identity pass-through: measures the fixed per-request cost of the serving path",
        inputs=(image_input(),),
        outputs=(TensorSpec("output", (1, -1, -1), "float32", "image", "the input, unchanged"),),
    )


def spec_for(name: str) -> ModelSpec:
    if name == FLOOR_MODEL:
        return floor_spec()
    from training.registry import get_spec

    return get_spec(name)


def _repo_dir(repo_dir: str | Path | None) -> Path:
    if repo_dir is not None:
        return Path(repo_dir)
    from training import paths

    return paths.REPOSITORY_DIR


def onnx_path(name: str, repo_dir: str | Path | None = None) -> Path:
    return _repo_dir(repo_dir) / name / VERSION / ONNX_FILE


# --------------------------------------------------------------------------------------------- config


def _triton_dtype(dtype: str) -> int:
    import numpy as np
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.utils import np_to_triton_dtype

    t = np_to_triton_dtype(np.dtype(dtype))
    return mc.DataType.Value("TYPE_STRING" if t == "BYTES" else f"TYPE_{t}")


def _warmup_dims(t: TensorSpec, side: int) -> list[int]:
    # Warm-up needs concrete dims: dynamic spatial axes take the side the model was trained at.
    return [side if d < 0 else d for d in t.shape]


def model_config(spec: ModelSpec, target: str = "cpu", *, dynamic_batching: bool = True,
                 platform: str | None = None, max_batch_size: int | None = None) -> Any:
    """Triton's ``ModelConfig`` protobuf for one spec.

    ``platform`` (gpu only) picks ``onnxruntime_onnx`` (default) or ``tensorrt_plan``;
    ``dynamic_batching=False`` gives the same model without the dynamic batcher (benchmarks use it).
    """
    from tritonclient.grpc import model_config_pb2 as mc

    if target not in TARGETS:
        raise RepositoryError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    so = spec.serving
    mbs = max_batch_size or so.max_batch_size
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=mbs)
    if target == "cpu":
        cfg.backend = "python"
    else:
        cfg.platform = platform or "onnxruntime_onnx"
        cfg.default_model_filename = PLAN_FILE if cfg.platform == "tensorrt_plan" else ONNX_FILE
    for t in spec.inputs:
        cfg.input.add(name=t.name, data_type=_triton_dtype(t.dtype), dims=list(t.shape))
    for t in spec.outputs:
        cfg.output.add(name=t.name, data_type=_triton_dtype(t.dtype), dims=list(t.shape))
    if dynamic_batching:
        cfg.dynamic_batching.preferred_batch_size.extend(b for b in so.preferred_batch_sizes if b <= mbs)
        cfg.dynamic_batching.max_queue_delay_microseconds = so.max_queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_CPU if target == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.add(count=so.instance_count, kind=kind)
    cfg.version_policy.latest.num_versions = 1
    side = spec.train.canvas
    for batch in sorted({1, max(b for b in (*so.preferred_batch_sizes, 1) if b <= mbs)}):
        w = cfg.model_warmup.add(name=f"batch{batch}_{side}px", batch_size=batch)
        for t in spec.inputs:
            w.inputs[t.name].data_type = _triton_dtype(t.dtype)
            w.inputs[t.name].dims.extend(_warmup_dims(t, side))
            w.inputs[t.name].zero_data = True  # random_data is random bytes: NaNs in FP32
    # Read by the generic backend (file, threads) and by clients (how to present each output).
    params = {
        "onnx_file": ONNX_FILE,
        "intra_op_threads": str(so.intra_op_threads),  # 0: the host's usable cores divided among the instances
        "output_kinds": json.dumps({t.name: t.kind for t in spec.outputs}),
        "description": spec.description,
    }
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def intra_op_threads(cfg: Any) -> int:
    """The onnxruntime thread count the generic backend will use for ``cfg`` (same rule as model.py)."""
    import os

    instances = sum(g.count or 1 for g in cfg.instance_group) or 1
    fixed = int(cfg.parameters["intra_op_threads"].string_value or 0)
    return fixed or max(1, len(os.sched_getaffinity(0)) // instances)


def config_text(cfg: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def config_json(cfg: Any) -> str:
    """The JSON form Triton's ``load_model(config=...)`` override takes."""
    from google.protobuf import json_format

    return json_format.MessageToJson(cfg, preserving_proto_field_name=True)


def parse_config(text: str, source: str = "config.pbtxt") -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{source}: not a valid Triton model config: {e}") from None


def validate_config(text: str, spec: ModelSpec | None = None, source: str = "config.pbtxt") -> Any:
    """Parse with Triton's protobuf and check it agrees with the spec; returns the ``ModelConfig``."""
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = parse_config(text, source)

    def fail(msg: str) -> None:
        raise RepositoryError(f"{source}: {msg}")

    if not cfg.name:
        fail("no model name")
    if not cfg.backend and not cfg.platform:
        fail("neither backend nor platform is set")
    if cfg.max_batch_size < 1:
        fail(f"max_batch_size must be >= 1, got {cfg.max_batch_size}")
    for b in cfg.dynamic_batching.preferred_batch_size:
        if not 1 <= b <= cfg.max_batch_size:
            fail(f"preferred batch size {b} outside 1..{cfg.max_batch_size}")
    if not cfg.instance_group:
        fail("no instance_group")
    for w in cfg.model_warmup:
        if set(w.inputs) != {i.name for i in cfg.input}:
            fail(f"warmup {w.name!r} does not feed exactly the model's inputs")
    if spec is not None:
        if cfg.name.removesuffix(TRT_SUFFIX) != spec.name:
            fail(f"model name {cfg.name!r} does not match spec {spec.name!r}")
        for kind, got, want in (("input", cfg.input, spec.inputs), ("output", cfg.output, spec.outputs)):
            got_t = [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in got]
            want_t = [(t.name, mc.DataType.Name(_triton_dtype(t.dtype)), list(t.shape)) for t in want]
            if got_t != want_t:
                fail(f"{kind}s {got_t} do not match the spec's {want_t}")
    return cfg


# --------------------------------------------------------------------------------------------- writing


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a server polling the repository never reads half a config


def write_floor_onnx(path: Path) -> Path:
    """An Identity graph with the image input's signature (dynamic batch, H, W)."""
    import onnx
    from onnx import TensorProto, helper

    spec = floor_spec()
    dims = ["batch", *[d if d > 0 else f"dim{i}" for i, d in enumerate(spec.input.shape)]]
    graph = helper.make_graph(
        [helper.make_node("Identity", [spec.input.name], [spec.outputs[0].name])],
        FLOOR_MODEL,
        [helper.make_tensor_value_info(spec.input.name, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(spec.outputs[0].name, TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by older onnxruntime builds (e.g. a Triton container's)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _servable_plan(plan: Path, name: str, root: Path) -> bool:
    """Whether Triton's TensorRT backend can load ``plan``: its sidecar must say full TensorRT built it.

    TensorRT-RTX and ahead-of-time engines (``make engines`` on a CPU host) are never served; a plan
    without metadata cannot be vouched for. Either is skipped with a note naming the file.
    """
    if not plan.exists():
        return False
    from export.tensorrt import repository_plan

    info = repository_plan(name, root, int(VERSION))
    if info is None:
        why = "it has no model.plan.json (architecture and TensorRT version unknown)"
    elif not info.triton_loadable:
        why = f"it is a {info.label}, which Triton's TensorRT backend cannot load"
    else:
        return True
    print(f"serving.repository: {plan} not served as {name}{TRT_SUFFIX}: {why}", file=sys.stderr)
    return False


def write_model(spec: ModelSpec, target: str = "cpu", repo_dir: str | Path | None = None) -> list[Path]:
    """Add config.pbtxt (and, for cpu, model.py) next to ``<repo>/<name>/1/model.onnx``."""
    root = _repo_dir(repo_dir)
    mdir = root / spec.name
    onnx_file = mdir / VERSION / ONNX_FILE
    if spec.name == FLOOR_MODEL and not onnx_file.exists():
        write_floor_onnx(onnx_file)
    if not onnx_file.exists():
        raise RepositoryError(f"model {spec.name!r}: missing {onnx_file} (run `python -m export {spec.name}`)")
    written = []
    cfg_path = mdir / "config.pbtxt"
    text = config_text(model_config(spec, target))
    validate_config(text, spec, source=str(cfg_path))
    _write_text(cfg_path, text)
    written.append(cfg_path)
    if target == "cpu":
        dst = mdir / VERSION / "model.py"
        shutil.copyfile(BACKEND_MODEL_PY, dst)
        written.append(dst)
    plan = mdir / VERSION / PLAN_FILE
    if target == "gpu" and _servable_plan(plan, spec.name, root):
        # Triton serves one platform per model: the engine becomes a sibling model "<name>_trt".
        tdir = root / f"{spec.name}{TRT_SUFFIX}"
        (tdir / VERSION).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan, tdir / VERSION / PLAN_FILE)
        cfg = model_config(spec, target, platform="tensorrt_plan",
                           max_batch_size=min(spec.serving.max_batch_size, spec.export.profile_batch[2]))
        cfg.name = tdir.name
        text = config_text(cfg)
        validate_config(text, spec, source=str(tdir / "config.pbtxt"))
        _write_text(tdir / "config.pbtxt", text)
        written += [tdir / "config.pbtxt", tdir / VERSION / PLAN_FILE]
    return written


def write_repository(models: Iterable[str] | None = None, target: str = "cpu",
                     repo_dir: str | Path | None = None) -> list[Path]:
    """Generate configs for ``models`` (default: every registered model with an exported graph) plus
    the pass-through floor model. Named models without ``model.onnx`` are an error; with ``models=None``
    they are skipped with a note on stderr. Returns the files written."""
    from training.registry import list_models

    root = _repo_dir(repo_dir)
    if models is None:
        names = [n for n in list_models() if onnx_path(n, root).exists()]
        missing = sorted(set(list_models()) - set(names))
        if missing:
            print(f"serving.repository: not exported yet, skipped: {', '.join(missing)}", file=sys.stderr)
    else:
        names = [n for n in models if n != FLOOR_MODEL]
    written: list[Path] = []
    for name in [*names, FLOOR_MODEL]:
        written += write_model(spec_for(name), target, root)
    return written


def served_models(repo_dir: str | Path | None = None) -> list[str]:
    """Model directories that have a config.pbtxt (what the server loads)."""
    root = _repo_dir(repo_dir)
    return sorted(p.parent.name for p in root.glob("*/config.pbtxt"))


def check_repository(repo_dir: str | Path | None = None) -> list[str]:
    """Validate every config.pbtxt in the repository against its spec; returns the model names."""
    root = _repo_dir(repo_dir)
    names = served_models(root)
    for name in names:
        path = root / name / "config.pbtxt"
        validate_config(path.read_text(), spec_for(name.removesuffix(TRT_SUFFIX)), source=str(path))
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.repository", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="models to generate (default: every exported model)")
    p.add_argument("--target", choices=TARGETS, default="cpu",
                   help="cpu: python backend + onnxruntime (pip's tritonserver); gpu: native backends")
    p.add_argument("--repo", type=Path, default=None, help="repository folder (default: model_repository/)")
    p.add_argument("--check", action="store_true", help="only validate the existing configs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        if args.check:
            names = check_repository(args.repo)
            print(f"{len(names)} valid model configs: {', '.join(names)}")
        else:
            for path in write_repository(args.models or None, args.target, args.repo):
                print(path)
    except Exception as e:
        return cli_error(e, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
