"""Markdown pieces the generated reports share (``reports/fp16.md``, ``int8.md``, ``variants.md``)."""

from __future__ import annotations

from typing import Any


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dash(v: Any, fmt: str) -> str:
    """``v`` formatted, or ``-`` where it was not measured (None)."""
    return "-" if v is None else format(v, fmt)


def per_output(values: dict[str, float], fmt: str) -> str:
    """``name value, ...`` per output, or ``-`` for none."""
    return ", ".join(f"{k} {format(v, fmt)}" for k, v in values.items()) or "-"


HOST_LINE_PREFIX = "Measured on: "


def host_line() -> str:
    """The line every report that prints speeds carries under its title: the CPU and the instruction set its
    kernels ran with, so that an AVX-512 figure is never read beside an AVX2 one."""
    from training.fingerprint import isa_summary

    return f"{HOST_LINE_PREFIX}{isa_summary()}."


def with_host_line(markdown: str) -> str:
    """``markdown`` with ``host_line()`` inserted after its title (replacing an earlier one)."""
    lines = [ln for ln in markdown.split("\n") if not ln.startswith(HOST_LINE_PREFIX)]
    at = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("# ")), 0)
    return "\n".join([*lines[:at], "", host_line(), *lines[at:]]).replace("\n\n\n", "\n\n")
