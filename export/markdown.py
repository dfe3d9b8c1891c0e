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
