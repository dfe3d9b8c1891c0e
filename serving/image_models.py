"""Raw image files over the wire: ``<name>_image`` for every model with an image input.

Two Triton models per image model, generated beside its own:

- ``<name>_preprocess`` (python backend, ``backend/preprocess.py``): a BYTES input ``image_file`` (one encoded
  file per batch element) -> the model's image input, through the spec's eval transform
  (``ModelSpec.image_preprocess``, written into the config as JSON);
- ``<name>_image`` (Triton's ensemble scheduler): that step, then ``<name>`` itself. Its rank-1 class outputs
  carry ``label_filename: "labels.txt"``, so Triton's classification extension answers a request for
  ``class_count=k`` with the top-k ``score:index:label`` strings, over gRPC and HTTP.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.contract import Contract
from training import layout

if TYPE_CHECKING:
    from training.registry import ModelSpec, TensorSpec

FILE_INPUT = "image_file"
LABELS_FILE = "labels.txt"
IMAGE_TENSOR = "_decoded_image"  # the ensemble's internal tensor between the two steps
PREPROCESS_INSTANCES = 2  # see preprocess_config
BACKEND_PREPROCESS_PY = Path(__file__).resolve().parent / "backend" / "preprocess.py"


def file_input() -> TensorSpec:
    from training.registry import TensorSpec

    return TensorSpec(FILE_INPUT, (1,), "object", "file", "encoded image file (JPEG, PNG, WebP, BMP), any size")


def image_model_name(spec: ModelSpec) -> str:
    return spec.name + layout.IMAGE_SUFFIX


def preprocess_model_name(spec: ModelSpec) -> str:
    return spec.name + layout.PREPROCESS_SUFFIX


def has_image_models(spec: ModelSpec) -> bool:
    return spec.image_preprocess() is not None


def _labelled(t: TensorSpec) -> bool:
    return t.kind == "logits" and len(t.axes) == 1 and isinstance(t.axes[0], int)


def preprocess_config(spec: ModelSpec) -> Any:
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.modelconfig import add_tensors, set_parameters

    pre = spec.image_preprocess()
    image = spec.image_input
    cfg = mc.ModelConfig(name=preprocess_model_name(spec), max_batch_size=spec.serving.max_batch_size,
                         backend="python")
    out = image.__class__(image.name, (pre.channels, pre.size, pre.size), "float32", "image", image.description)
    add_tensors(cfg, [file_input()], [out])
    cfg.dynamic_batching.max_queue_delay_microseconds = spec.serving.max_queue_delay_us
    # Decoding runs on the CPU on any host. Two instances at least: the front door lets one large-image request
    # per model decode at a time (its lane), so a stream of them holds one instance and small requests keep the
    # other (reports/reliability.md measures it); more would compete with the model's own threads.
    cfg.instance_group.add(count=max(PREPROCESS_INSTANCES, spec.serving.instance_count),
                           kind=mc.ModelInstanceGroup.KIND_CPU)
    cfg.version_policy.latest.num_versions = 1
    set_parameters(cfg, Contract(f"encoded image files -> {spec.name}'s input '{image.name}'",
                                 preprocess=pre).parameters())
    return cfg


def image_config(spec: ModelSpec) -> Any:
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.modelconfig import add_tensors, client_contract, set_parameters

    image = spec.image_input
    cfg = mc.ModelConfig(name=image_model_name(spec), max_batch_size=spec.serving.max_batch_size,
                         platform="ensemble")
    add_tensors(cfg, [file_input()], spec.outputs)
    for o in cfg.output:
        t = next(t for t in spec.outputs if t.name == o.name)
        if _labelled(t):
            o.label_filename = LABELS_FILE
    first = cfg.ensemble_scheduling.step.add(model_name=preprocess_model_name(spec), model_version=-1)
    first.input_map[FILE_INPUT] = FILE_INPUT
    first.output_map[image.name] = IMAGE_TENSOR
    second = cfg.ensemble_scheduling.step.add(model_name=spec.name, model_version=-1)
    second.input_map[image.name] = IMAGE_TENSOR
    second.output_map.update({t.name: t.name for t in spec.outputs})
    contract = client_contract(spec, [file_input()], spec.outputs)
    set_parameters(cfg, dataclasses.replace(contract, preprocess=spec.image_preprocess()).parameters())
    return cfg


def labels_text(spec: ModelSpec) -> str | None:
    labelled = [t for t in spec.outputs if _labelled(t)]
    if not labelled:
        return None
    return "\n".join(spec.labels(int(labelled[0].axes[0]))) + "\n"


def write_image_models(spec: ModelSpec, root: Path) -> list[Path]:
    """``<name>_preprocess`` and ``<name>_image`` for ``spec`` (nothing for a model without an image input)."""
    from serving.modelconfig import check_config, config_text, copy_file, write_text

    if not has_image_models(spec):
        return []
    written = []
    for cfg in (preprocess_config(spec), image_config(spec)):
        path = layout.config_path(cfg.name, root)
        text = config_text(cfg)
        check_config(text, source=str(path))
        write_text(path, text)
        written.append(path)
        layout.version_dir(cfg.name, root).mkdir(parents=True, exist_ok=True)
    written.append(copy_file(BACKEND_PREPROCESS_PY,
                             layout.version_dir(preprocess_model_name(spec), root) / layout.BACKEND_FILE))
    labels = labels_text(spec)
    if labels:
        path = layout.model_dir(image_model_name(spec), root) / LABELS_FILE
        write_text(path, labels)
        written.append(path)
    return written

