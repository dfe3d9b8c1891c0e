"""Per-model int8 choices: the calibration method and what stays float, chosen by measurement.

They live in ``export/int8/choices.json`` (tracked, written by ``python -m export.int8 --probe``, read by the
export and the gate), not in the specs: a spec lives in its model's file under ``training/models/``, and
editing that file changes the model's weights fingerprint and retrains it. A model absent from the file is
quantized with ``Int8Choice()``'s defaults (MinMax, nothing kept float) until it is probed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHOICES_PATH = Path(__file__).resolve().parent / "choices.json"
METHODS = ("MinMax", "Entropy", "Percentile")


@dataclass(frozen=True)
class Int8Choice:
    """``keep_fp32_nodes``: graph name -> node names (of the pre-processed graph) left in float;
    ``keep_fp32_ops``: op types left in float in every graph; ``calibration_images``: training-split images
    the calibrator sees."""

    calibration: str = "MinMax"
    keep_fp32_ops: tuple[str, ...] = ()
    keep_fp32_nodes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    calibration_images: int = 256
    why: str = "default (not probed)"
    # False: the int8 graph missed its test-split gate when last measured, so none is built, gated or served
    # (a variant that misses its gate is never shipped); ``not_shipped`` says why.
    ship: bool = True
    not_shipped: str = ""

    def __post_init__(self) -> None:
        if self.calibration not in METHODS:
            raise ValueError(f"unknown calibration method {self.calibration!r}; expected one of {METHODS}")

    def kept(self, graph: str) -> tuple[str, ...]:
        return tuple(self.keep_fp32_nodes.get(graph, ()))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_fp32_ops"] = list(self.keep_fp32_ops)
        d["keep_fp32_nodes"] = {g: list(v) for g, v in self.keep_fp32_nodes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int8Choice:
        return cls(calibration=d.get("calibration", "MinMax"), keep_fp32_ops=tuple(d.get("keep_fp32_ops", ())),
                   keep_fp32_nodes={g: tuple(v) for g, v in d.get("keep_fp32_nodes", {}).items()},
                   calibration_images=int(d.get("calibration_images", 256)), why=d.get("why", ""),
                   ship=bool(d.get("ship", True)), not_shipped=d.get("not_shipped", ""))


def load_choices(path: Path | None = None) -> dict[str, Int8Choice]:
    p = path or CHOICES_PATH
    if not p.is_file():
        return {}
    return {name: Int8Choice.from_dict(d) for name, d in json.loads(p.read_text()).items()}


def choice_for(name: str, path: Path | None = None) -> Int8Choice:
    return load_choices(path).get(name, Int8Choice())


def save_choice(name: str, choice: Int8Choice, path: Path | None = None) -> Path:
    """Record ``choice`` for model ``name`` (other models' entries are kept)."""
    p = path or CHOICES_PATH
    data = json.loads(p.read_text()) if p.is_file() else {}
    data[name] = choice.as_dict()
    p.write_text(json.dumps(dict(sorted(data.items())), indent=2) + "\n")
    return p
