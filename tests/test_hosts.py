"""Hosts of this kind differ in instruction set (AVX2 only, or AVX-512 with VNNI/BF16): every record and report
says which kernels produced its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from export.markdown import HOST_LINE_PREFIX, host_line, with_host_line
from training.fingerprint import cpu_kernel_flags, host_fingerprint

ROOT = Path(__file__).resolve().parent.parent
# Reports that print speeds (latency, throughput, build or train seconds).
SPEED_REPORTS = ("bench", "engines", "images", "int8", "int8_roofline", "ort_vs_torch", "pipeline_two_level",
                 "reliability", "sweep_feedback_iters", "variants", "variants_served")


def test_host_line_sits_under_the_title_once_and_names_the_instruction_set():
    md = with_host_line(with_host_line("# Title\n\nText.\n\n| a |\n|---|\n"))
    lines = md.split("\n")
    assert lines[0] == "# Title" and lines[2] == host_line()
    assert sum(ln.startswith(HOST_LINE_PREFIX) for ln in lines) == 1
    assert f"torch kernels {torch.backends.cpu.get_cpu_capability()}" in host_line()


def test_every_speed_report_says_where_it_was_measured():
    for name in SPEED_REPORTS:
        head = (ROOT / "reports" / f"{name}.md").read_text().split("\n")[:6]
        assert any(ln.startswith(HOST_LINE_PREFIX) for ln in head), f"reports/{name}.md has no host line"


def test_isa_limit_variables_take_effect_and_are_recorded():
    """The README's recipe for testing an AVX2 host's kernels on an AVX-512 host: torch dispatches to AVX2 and
    the host record says so (and that a limit was set), so it is never taken for the unlimited host."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", "import json; from training.fingerprint import host_fingerprint; "
                          "print(json.dumps(host_fingerprint()))"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    held = json.loads(out)
    assert held["cpu_capability"] == "AVX2"
    here = host_fingerprint()  # (under `bench.cpuid_mask`, its CPUID_MASK limit is in both)
    assert held["isa_limits"] == {**here["isa_limits"], "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert held["cpu_flags"] == cpu_kernel_flags()  # what the CPU has, whatever torch is held to
    if "avx512f" in here["cpu_flags"] and not here["isa_limits"]:
        assert here["cpu_capability"] == "AVX512"
