"""The export manifest: what export produced for one model, in one file that the later stages read.

``model_repository/<model>/export.json`` sits beside the model's ``config.pbtxt`` (Triton ignores other files
there, and the manifest travels with the repository it describes). ``export.pipeline.export_model`` writes it; the
int8 gate, the engine builder and the host choice amend it. The repository generator reads it instead of guessing
from which files exist: a variant is served only where the manifest says its gate passed *and* the file still has
the checksum the gate saw (a graph replaced after export is refused, naming the file).

Schema (``SCHEMA``)::

    {"schema": 1, "model": "racnn", "exported_at": "...", "weights": {"file", "sha256"},
     "versions": {"torch", "onnx", "onnxruntime"}, "opset": 18,
     "graphs": {graph: {"triton_model", "profile_batch": [min, opt, max]}},
     "variants": {"fp32" | "fp16" | "int8": {"files": {graph: {"file", "sha256"}}, "gate": {"passed", ...}}},
     "tensorrt": "parsed (...)", "engines": {triton model: {precision: {...}}},
     "host_choice": {isa key: {...}}}

Paths are stored relative to the repository root (``model_repository/``) for served graphs and to the project
root otherwise, so that a repository copied elsewhere is checked against its own files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training import layout, paths
from training.checkpoints import file_sha256
from training.fingerprint import library_versions

SCHEMA = 1


class ManifestError(RuntimeError):
    """A manifest that is missing, of another schema, or that disagrees with the files it names."""


MANIFEST_FILE = "export.json"


def manifest_path(name: str, repo_dir: str | Path | None = None) -> Path:
    return layout.model_dir(name, repo_dir) / MANIFEST_FILE


def _entry(path: Path, repo: Path) -> dict[str, str]:
    """``{"file", "sha256"}`` with ``file`` relative to the repository when it is served from there."""
    path = Path(path).resolve()
    for base, tag in ((repo.resolve(), "repository"), (paths.REPO_ROOT, "project")):
        if path.is_relative_to(base):
            return {"in": tag, "file": str(path.relative_to(base)), "sha256": file_sha256(path)}
    return {"in": "absolute", "file": str(path), "sha256": file_sha256(path)}


def resolve(entry: Mapping[str, str], repo_dir: str | Path | None = None) -> Path:
    """The file a manifest entry names, under ``repo_dir`` when it is a served graph."""
    if entry["in"] == "repository":
        return layout.repository_root(repo_dir) / entry["file"]
    return paths.REPO_ROOT / entry["file"] if entry["in"] == "project" else Path(entry["file"])




def load(name: str, repo_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The manifest of ``name`` or None when export never wrote one; another schema is an error."""
    p = manifest_path(name, repo_dir)
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    if data.get("schema") != SCHEMA:
        raise ManifestError(f"{p}: manifest schema {data.get('schema')!r}, this code reads {SCHEMA} "
                            f"(re-run `make export`)")
    return data


def save(data: dict[str, Any], repo_dir: str | Path | None = None) -> Path:
    p = manifest_path(data["model"], repo_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(p)  # readers never see half a manifest
    return p


def amend(name: str, section: str, value: Any, repo_dir: str | Path | None = None) -> Path | None:
    """Set one top-level ``section`` of an existing manifest (engines, host choice); no manifest: nothing."""
    data = load(name, repo_dir)
    if data is None:
        return None
    data[section] = value
    return save(data, repo_dir)


def verdict(result: Mapping[str, Any]) -> dict[str, Any]:
    """A gate's verdict as the manifest records it: the scalar fields (per-output detail stays in reports/)."""
    return {k: v for k, v in result.items() if k in ("passed", "agreement", "n", "status", "metric_drop",
                                                     "int8_metric", "fp32_metric", "max_abs")}


def set_variant(name: str, variant: str, files: Mapping[str, Path] | None, gate: Mapping[str, Any],
                repo_dir: str | Path | None = None) -> Path | None:
    """Record (or, with ``files=None``, remove) one variant with its gate verdict; no manifest: nothing."""
    data = load(name, repo_dir)
    if data is None:
        return None
    repo = layout.repository_root(repo_dir)
    if files is None:
        data["variants"].pop(variant, None)
    else:
        data["variants"][variant] = {"files": {g: _entry(p, repo) for g, p in files.items()}, "gate": dict(gate)}
    return save(data, repo_dir)


def write(spec: Any, graph_files: Mapping[str, Path], fp32_gate: Mapping[str, Any], *, tensorrt: str = "",
          repo_dir: str | Path | None = None) -> Path:
    """A fresh manifest for ``spec`` after its fp32 graphs were exported and passed parity."""
    from training.checkpoints import checkpoint_path

    repo = layout.repository_root(repo_dir)
    weights = checkpoint_path(spec.name)
    data = {
        "schema": SCHEMA,
        "model": spec.name,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "weights": _entry(weights, repo) if weights.is_file() else None,
        "versions": library_versions(("torch", "onnx", "onnxruntime", "openvino")),
        "opset": spec.export.opset,
        "graphs": {g.name: {"triton_model": spec.graph_model_name(g), "profile_batch": list(spec.export.profile_batch)}
                   for g in spec.deploy_graphs()},
        "variants": {"fp32": {"files": {g: _entry(p, repo) for g, p in graph_files.items()}, "gate": dict(fp32_gate)}},
        "tensorrt": tensorrt,
        "engines": {},
        "host_choice": {},
    }
    return save(data, repo_dir)


def servable(data: Mapping[str, Any], variant: str, repo_dir: str | Path | None = None) -> dict[str, Path] | None:
    """The graph files of ``variant`` when its gate passed and every file is present with the recorded checksum;
    None when the variant was not made or missed its gate. A file changed since its gate ran raises, naming it."""
    v = data.get("variants", {}).get(variant)
    if not v or not v.get("gate", {}).get("passed"):
        return None
    out = {}
    for g, e in v["files"].items():
        p = resolve(e, repo_dir)
        if not p.is_file():
            return None
        if file_sha256(p) != e["sha256"]:
            raise ManifestError(f"model {data['model']!r}: {p} is not the {variant} graph that passed its gate at "
                                f"export (sha256 differs); re-run `make export` (or `python -m export "
                                f"{data['model']}`)")
        out[g] = p
    return out
