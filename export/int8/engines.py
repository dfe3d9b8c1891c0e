"""TensorRT-RTX on the QDQ graphs: parse the ``tensorrt`` flavour of each int8 graph (symmetric int8, float
bias; see ``export.int8.quantize``) and build it ahead of time for ``archs`` (explicit quantization: the
strongly typed builder takes int8 from the Q/DQ nodes). No GPU is needed to build; running one needs a GPU of
an architecture RTX can target (not SM90), so these engines prove the graphs parse and build.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from export.int8.choices import Int8Choice
from export.int8.gate import build_int8_graphs
from training import layout
from training.registry import ModelSpec


def build_int8_engines(spec: ModelSpec, fp32: dict[str, Path], choice: Int8Choice,
                       archs: tuple[str, ...] = ("sm86",)) -> dict[str, Any]:
    """Per graph: the TensorRT QDQ graph, its parse (layers) and engine (size, build seconds), or the error."""
    from export.tensorrt import TensorRTUnavailableError, build_engine, import_trt, parse_onnx

    try:
        _, flavour = import_trt()
    except TensorRTUnavailableError as e:
        return {"skipped": str(e)}
    graphs = {g.name: g for g in spec.deploy_graphs()}
    qdq = build_int8_graphs(spec, fp32, choice, flavour="tensorrt")
    out: dict[str, Any] = {"flavour": flavour, "archs": list(archs), "graphs": {}}
    for name, path in qdq.items():
        row: dict[str, Any] = {"onnx": str(path)}
        out["graphs"][name] = row
        try:
            report = parse_onnx(path)
            row["parsed"] = f"ok ({report.num_layers} layers)"
            triton = spec.graph_model_name(graphs[name])
            plan = layout.engine_dir(triton) / "int8" / layout.PLAN_FILE
            info = build_engine(path, spec, plan, archs=archs, precision="int8", graph=graphs[name])
            row["engine"] = {k: v for k, v in asdict(info).items() if k in ("plan", "plan_bytes", "build_seconds")}
        except Exception as e:  # the parser's or builder's one-line message, naming the node
            row["error"] = str(e).strip().splitlines()[0][:300]
    return out
