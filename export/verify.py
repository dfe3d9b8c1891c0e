"""python -m export.verify <model> [--onnx PATH]: re-check existing graphs without re-exporting them.

Runs the ONNX checker, the spec's I/O contract, the parity gate against the trained torch model, and the
TensorRT parse. Meant for graphs that were copied, edited or produced elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.onnx_export import check_graph
from export.parity import check_parity
from export.pipeline import graph_paths, tensorrt_parse
from training.checkpoints import load_trained
from training.registry import get_spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__)
    p.add_argument("model")
    p.add_argument("--onnx", type=Path, help="graph to verify (one-graph models; default: the repository's graph)")
    p.add_argument("--custom-ops", action="store_true", help="the graph holds custom-domain nodes")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    try:
        spec = get_spec(a.model)
        files = graph_paths(spec, a.custom_ops)
        if a.onnx:
            if len(files) != 1:
                raise ValueError(f"model {spec.name!r} has {len(files)} graphs; --onnx names one graph only")
            files = {next(iter(files)): a.onnx}
        graphs = {g.name: g for g in spec.deploy_graphs()}
        for g, path in files.items():
            if not path.exists():
                raise FileNotFoundError(f"ONNX file not found: {path}")
            check_graph(path, graphs[g], spec.name)
        result = check_parity(spec, load_trained(spec.name), files, custom_ops=a.custom_ops)
        trt = "skipped (custom-op graph)" if a.custom_ops else "; ".join(tensorrt_parse(p) for p in files.values())
    except Exception as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    agree = "-" if result.min_agreement is None else f"{result.min_agreement:.4f}"
    print(f"{spec.name}: {', '.join(map(str, files.values()))} ok; parity max abs {result.worst:.2e}, "
          f"agreement {agree} over {len(result.cases)} cases; tensorrt {trt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
