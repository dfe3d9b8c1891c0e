"""The deployable variants of each model's graphs and their gate verdicts: ``fp32`` (the parity gate,
reports/parity.json), ``fp16`` (the FP16 gate, reports/fp16.json) and ``int8`` (the INT8 gate,
reports/int8.json). Read at deploy time (``export.host_choice``); the timing of the variants side by side
is ``bench.variants`` (reports/variants.{md,json,png}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training import layout, paths

VARIANTS = ("fp32", "fp16", "int8")


def _read(name: str) -> dict[str, Any]:
    p = paths.REPORTS_DIR / name
    return json.loads(p.read_text()) if p.is_file() else {}


def variant_graphs(spec: Any) -> dict[str, dict[str, Path]]:
    """Variant -> graph name -> ONNX file, for the variants whose every graph exists."""
    out = {}
    for v in VARIANTS:
        files = {}
        for g in spec.deploy_graphs():
            triton = spec.graph_model_name(g)
            files[g.name] = {"fp32": layout.onnx_path(triton), "fp16": layout.fp16_onnx_path(triton),
                             "int8": layout.int8_onnx_path(triton)}[v]
        if all(p.is_file() for p in files.values()):
            out[v] = files
    return out


def gates(name: str) -> dict[str, dict[str, Any]]:
    """Variant -> {passed, accuracy, agreement, source} from the gates' reports (None where not recorded)."""
    parity, fp16, int8 = _read("parity.json").get(name, {}), _read("fp16.json").get(name, {}), \
        _read("int8.json").get(name, {})
    p = parity.get("parity") or {}
    out = {"fp32": {"passed": bool(p) and p.get("passed", False) and not parity.get("error"),
                    "metric": next(iter((parity.get("metrics") or {}).values()), None),
                    "agreement": parity.get("parity_agreement")}}
    g = fp16.get("gate")
    out["fp16"] = {"passed": g["passed"], "metric": None, "agreement": g["agreement"]} if g else \
        {"passed": False, "metric": None, "agreement": None, "why": "no FP16 gate recorded"}
    g = int8.get("gate")
    out["int8"] = {"passed": g["passed"], "metric": g["int8_metric"], "agreement": g["agreement"]} if g else \
        {"passed": False, "metric": None, "agreement": None, "why": "no INT8 gate recorded"}
    return out
