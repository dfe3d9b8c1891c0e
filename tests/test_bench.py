"""The top-level ``bench`` package (issue #26): the runtime packages keep no benchmark, ``python -m bench.int8``
times the int8 graphs the gate recorded and merges the timings into the int8 report, and ``bench.served_engine``
serves the repository's config beside the default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from serving.cli import COMMANDS
from training import layout, paths

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ("training", "export", "serving")


def test_the_runtime_packages_never_name_bench_in_code():
    """tests/test_imports.py walks the import statements; this also catches a module *name* that would be imported
    by string (importlib, runpy, ``-m``) anywhere but the console script's table, which runs at the top."""
    rx = re.compile(r"""["'](?:-m\s+)?bench\.\w+""")
    found = [f"{p.relative_to(ROOT)}:{i}" for pkg in RUNTIME for p in sorted((ROOT / pkg).rglob("*.py"))
             if p != ROOT / "serving" / "cli.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line)]
    assert not found, f"runtime modules that name a bench module: {found}"
    assert {c.module.split(".")[0] for c in COMMANDS.values()} <= {*RUNTIME, "bench"}


def test_int8_bench_refuses_an_unknown_model_and_a_model_without_a_gate(tmp_path, monkeypatch, capsys):
    from bench import int8

    assert int8.main(["no_such_model"]) == 2
    monkeypatch.setattr(paths, "REPORTS_DIR", tmp_path)
    assert int8.main(["cnn"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: model 'cnn': no int8 gate recorded in ") and "python -m export.int8 cnn" in last
    assert not (tmp_path / "int8.md").exists()


def test_int8_bench_merges_its_timings_into_the_gate_report(tmp_path, monkeypatch):
    from bench import int8

    report = paths.REPORTS_DIR / "int8.json"
    shipped = json.loads(report.read_text()) if report.is_file() else {}
    if not layout.int8_onnx_path("cnn").is_file() or "gate" not in shipped.get("cnn", {}):
        pytest.skip("cnn's int8 graph or gate is missing: run `make export` (int8 gate)")
    gated = {k: v for k, v in shipped["cnn"].items() if k != "bench"}
    monkeypatch.setattr(paths, "REPORTS_DIR", tmp_path)
    (tmp_path / "int8.json").write_text(json.dumps({"cnn": gated}))
    assert int8.main(["cnn", "--rounds", "2"]) == 0
    merged = json.loads((tmp_path / "int8.json").read_text())["cnn"]
    assert merged["gate"] == gated["gate"]  # the gate's entry is kept
    b = merged["bench"]["batches"]
    assert set(b) == {"1", "32"} and all(r["speedup"] > 0 for r in b.values())
    assert f"{b['32']['speedup']:.2f}" in (tmp_path / "int8.md").read_text()


def test_served_engine_pairs_the_served_config_with_the_default(tmp_path):
    """bench.served_engine loads, on one graph, the repository's config as served and the generator's default
    (onnxruntime, spin-wait off, one instance, no OpenVINO shapes)."""
    from bench.served_engine import write_pair
    from serving.repository import parse_config
    from tests.conftest import require_onnx

    require_onnx("cnn")
    pair = write_pair("cnn", tmp_path)
    assert pair == {"default": "cnn__default", "served": "cnn__served"}
    default = parse_config(layout.config_path(pair["default"], tmp_path).read_text())
    served = parse_config(layout.config_path(pair["served"], tmp_path).read_text())
    as_served = parse_config(layout.config_path("cnn").read_text())
    assert not {"allow_spinning", "engine", "shapes", "routes"} & set(default.parameters)  # backend defaults
    assert served.parameters == as_served.parameters and served.model_warmup == as_served.model_warmup
    for name in pair.values():
        assert layout.onnx_path(name, tmp_path).resolve() == layout.onnx_path("cnn").resolve()


def test_served_engine_report_keeps_the_rows_of_models_not_run_again(tmp_path):
    from bench.served_engine import write_report

    def row(p50: float, when: str) -> dict:
        lat = {"p50": p50, "p95": p50 * 1.2, "p99": p50 * 1.5, "rps": 100.0}
        return {"1": {"default": lat, "served": lat}, "16": {"default": lat, "served": lat},
                "served_as": "openvino static x1", "loadavg": "1.00 1.00 1.00", "measured_at": when}

    meta = {"duration": 1.0, "rounds": 1}
    write_report(tmp_path, {"cnn": row(2.0, "first"), "mhsa": row(3.0, "first")}, meta)
    rows = write_report(tmp_path, {"mhsa": row(4.0, "second")}, meta)
    assert rows["cnn"]["measured_at"] == "first" and rows["mhsa"]["measured_at"] == "second"
    text = (tmp_path / "served_engine.md").read_text()
    assert "| cnn |" in text and "4.00 / 4.80 / 6.00" in text and "3.00 /" not in text
    # cnn now served otherwise: its old row no longer describes what is served, and goes
    rows = write_report(tmp_path, {}, meta, {"cnn": "onnxruntime spin off x1", "mhsa": "openvino static x1"})
    assert set(rows) == {"mhsa"}
