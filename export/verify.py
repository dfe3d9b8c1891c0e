"""python -m export.verify <model> [--onnx PATH]: re-check an existing graph without re-exporting it.

Runs the ONNX checker, the spec's I/O contract, the parity gate against the trained torch model,
and the TensorRT parse. Meant for graphs that were copied, edited or produced elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.onnx_export import check_graph
from export.parity import check_parity
from export.pipeline import _tensorrt_parse, onnx_path
from training.checkpoints import load_trained
from training.registry import get_spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__)
    p.add_argument("model")
    p.add_argument("--onnx", type=Path, help="graph to verify (default: the model's repository graph)")
    p.add_argument("--custom-ops", action="store_true", help="the graph holds custom-domain nodes")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    try:
        spec = get_spec(a.model)
        path = a.onnx or onnx_path(spec.name, a.custom_ops)
        if not path.exists():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        check_graph(path, spec)
        result = check_parity(spec, load_trained(spec.name), path, custom_ops=a.custom_ops)
        trt = "skipped (custom-op graph)" if a.custom_ops else _tensorrt_parse(path)
    except Exception as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{spec.name}: {path} ok; parity max abs {result.worst:.2e}, top-1 agreement "
          f"{result.top1_agreement:.4f} over {len(result.cases)} cases; tensorrt {trt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
