"""Smoke test of the peer table (bench/peers.py): one small model, one batch, a few rounds, native and held to
AVX2 in a subprocess; torch.compile is left out here (its compile takes about a minute per shape on 2 cores)."""

from __future__ import annotations

import json
import os

import pytest

from bench import cpuid_mask, peers
from export.host_choice import isa_key
from export.markdown import HOST_LINE_PREFIX
from export.variants import variant_graphs
from serving.repository import read_stamp
from training.registry import get_spec


@pytest.mark.skipif("fp32" not in variant_graphs(get_spec("cnn")), reason="cnn not exported: run `make export`")
def test_peer_table_native_and_emulated_avx2(tmp_path) -> None:
    out = tmp_path / "peers.json"
    assert peers.main(["cnn", "--batches", "2", "--rounds", "2", "--runs", "2", "--no-compile", "--emulate-avx2",
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    native, others = data["sections"][isa_key()], [s for k, s in data["sections"].items() if k != isa_key()]
    if os.environ.get("CPUID_MASK"):  # this run is held already: the held subprocess is the same host
        assert not others
        emulated = native
    else:
        (emulated,) = others
    held_by = "CPUID_MASK=avx2" if cpuid_mask.unavailable() is None else "ATEN_CPU_CAPABILITY=avx2"
    # (after any limit this run was already under: the README's recipe runs the suite with ATEN_CPU_CAPABILITY)
    assert held_by in emulated["host"].partition("held by ")[2] and "AVX2" in emulated["host"]
    # both sections record the repository's choice; where it was made for another instruction set, they say so
    stamped = (read_stamp() or {}).get("isa_key")
    assert native["chosen_for"] == emulated["chosen_for"] == stamped
    for s in (native, emulated):
        m = s["models"]["cnn"]
        assert len(m["runs"]) == 2 and m["served"]["engine"] in ("onnxruntime", "openvino")
        row = m["runs"][-1]["batches"]["2"]
        assert {"served", "onnxruntime", "openvino", "torch eager"} <= set(row["latency"])
        assert row["ratio"]["served"] == pytest.approx(1.0)
        assert all(v > 0 for v in row["ratio"].values())
        v = m["verdict"]["2"]  # served / OpenVINO (torch.compile not run), per run and their median
        ov = [r["batches"]["2"]["latency"]["served"]["p50"] / r["batches"]["2"]["latency"]["openvino"]["p50"]
              for r in m["runs"]]
        assert v["ratios"] == pytest.approx(ov) and v["median"] == pytest.approx(sum(ov) / 2)
        assert v["within_noise"] == (v["median"] <= peers.NOISE)
        assert len(s["loadavg"]) == 3
    md = out.with_suffix(".md").read_text()
    assert md.splitlines()[2].startswith(HOST_LINE_PREFIX)
    assert "load average" in md and "torch.compile: not run (--no-compile)" in md
    assert "Served no slower than the faster of OpenVINO and torch.compile" in md
    assert md.count("were chosen for") == sum(k != stamped for k in data["sections"])
