"""``python -m export.host_choice [models]``: which engine, precision and threading to serve, chosen on THIS host.

The shipped "best variant" (``reports/variants.json``) was measured on one host and says nothing about another:
on an AVX2-only host onnxruntime's int8 graphs are slower than its fp32 for most models, and OpenVINO's int8
answers for some graphs are wrong. So, per model and per host instruction set:

1. candidates: every variant graph (fp32; int8 where its graph exists; fp16 only where the engine has fp16
   kernels on this CPU) x every available CPU engine (onnxruntime, OpenVINO) x threading setting (onnxruntime's
   spin-wait off and on; OpenVINO has one);
2. each candidate is gated on this host: int8 on every engine by the INT8 gate itself (``export.int8.gate.measure``
   on that engine's answers here: int8 kernels differ by instruction set); onnxruntime fp32 by the recorded
   parity gate (``export.variants.gates``); OpenVINO fp32 by parity with onnxruntime's fp32 on real test images
   (the spec's per-output tolerance, top-1 agreement 1.0); a graph that does not compile fails its gate with the
   engine's reason;
3. candidates are timed side by side at batch 1 and 32 (interleaved rounds; each timed call follows an untimed
   one, and each spinning candidate's call an untimed pause, so that one session's spinning threads do not land
   on the next candidate's timed call);
4. the choice: among candidates that passed their gate, and (for a precision other than fp32) are faster than the
   same engine and threading's fp32 at every batch, the lowest geometric mean of p50 relative to the fastest
   candidate at each batch, unless the project's default (onnxruntime fp32, spin-wait off) is within 5% of it
   (``MARGIN``: a change must pay for itself beyond the run's noise). A variant slower than fp32 on this host is
   therefore never chosen;
5. routes by batch size: where the fastest candidate of a precision at batch 1 is not the fastest at 32
   (engines trade places: OpenVINO's static shapes ahead at batch 1, onnxruntime at 32, on some graphs), the
   finalists (those fastest ones, the rule's pick and the default) are timed again side by side at every power
   of two from 1 to 32 (``CROSSING_BATCHES``), and the model is served by one engine up to a batch size and
   another above it where that split is faster than the chosen candidate alone by more than ``MARGIN`` on the
   sizes it moves (``routed``; one crossing at most: a timing's noise does not make engines alternate).

Results are cached per host instruction set in ``artifacts/host_choice/<isa key>.json`` (the measurements, the
gates, library versions and graph digests; an entry is re-measured when any of those changed).
``choose(spec_name, host=None)`` is what a repository generator calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from training import paths
from training.cli import model_names

BATCHES = (1, 32)
METHOD = 2  # how candidates are timed; an entry timed by an older method is re-measured (2: spinners idle after)
CROSSING_BATCHES = (1, 2, 4, 8, 16, 32)  # where the finalists of a trade are timed again, to find the crossing
GATE_IMAGES = 500
ROUNDS = 20
ENGINES = ("onnxruntime", "openvino")
DEFAULT = ("onnxruntime", "fp32", "spin off")  # what the project serves without a choice (export.runtime)
MARGIN = 1.05  # another candidate replaces DEFAULT only when faster by more than this (the noise bound)


# ---------------------------------------------------------------- host key


def isa_key(host: dict[str, Any] | None = None) -> str:
    """A file-name-safe key for the host's instruction set: torch's dispatched capability, the kernel-selecting
    CPU flags and any limit set on them (an emulated AVX2 run gets its own key)."""
    from training.fingerprint import host_fingerprint

    h = host or host_fingerprint()
    flags = "+".join(h["cpu_flags"]) or "none"
    limits = ",".join(f"{k}={v}" for k, v in sorted(h.get("isa_limits", {}).items()))
    digest = hashlib.sha256(f"{flags}|{limits}".encode()).hexdigest()[:8]
    return f"{h['machine']}-{h['cpu_capability'].lower()}-{digest}"


def cache_path(host: dict[str, Any] | None = None, root: Path | None = None) -> Path:
    return (root or paths.ARTIFACTS_DIR / "host_choice") / f"{isa_key(host)}.json"


def _versions() -> dict[str, str | None]:
    from training.fingerprint import library_versions

    return library_versions(("onnxruntime", "openvino"))


def _digest(files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for g, p in sorted(files.items()):
        h.update(g.encode() + Path(p).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- engines and timing


def engines() -> list[str]:
    from export.openvino_runner import available

    return ["onnxruntime", *(["openvino"] if available() else [])]


def settings(engine: str) -> list[str]:
    """Settings per engine, each exactly as the python backend would serve it: onnxruntime's intra-op spin-wait
    off (the project's default) and on; OpenVINO compiled once for the graph's dynamic shapes, or per static shape
    with every batch padded up to a power-of-two bucket (a served model sees every batch size from 1 to its
    maximum: buckets bound the compiles to a handful per input size)."""
    return ["spin off", "spin on"] if engine == "onnxruntime" else ["dynamic", "static"]


def cpu_runner(spec: Any, files: dict[str, Path], engine: str, setting: str = "spin off",
               threads: int | None = None, up_to: int | None = None) -> Any:
    """One runner for the deployed graphs ``files`` on ``engine`` with a threading ``setting``; ``up_to``: the
    largest batch it will see (OpenVINO's static buckets stop there; default the spec's maximum batch)."""
    from export.parity import deployed_runner
    from export.runtime import intra_op_threads

    threads = threads or intra_op_threads()
    if engine == "onnxruntime":
        return deployed_runner(spec, files, threads=threads, spinning=setting == "spin on")
    if engine == "openvino":
        from export.openvino_runner import batch_buckets, openvino_deployed_runner

        static = setting == "static"
        return openvino_deployed_runner(spec, files, threads=threads, static=static,
                                        batch_buckets=batch_buckets(up_to or spec.serving.max_batch_size)
                                        if static else ())
    raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


def routes_of(served: dict[str, Any]) -> tuple[Any, ...]:
    """The ``export.cpu_engines.Route`` list a served choice (``choose()["served"][variant]``) stands for."""
    from export.cpu_engines import Route

    return Route.from_list(served.get("routes") or [{"up_to": None, "engine": served["engine"],
                                                      "setting": served["setting"]}])


def served_label(served: dict[str, Any]) -> str:
    """``"openvino static"``, or per batch size ``"openvino static <= 4, onnxruntime spin off > 4"``."""
    routes = routes_of(served)
    if len(routes) == 1:
        return f"{routes[0].engine} {routes[0].setting}"
    parts, low = [], 0
    for r in routes:
        parts.append(f"{r.engine} {r.setting} " + (f"<= {r.up_to}" if r.up_to is not None else f"> {low}"))
        low = r.up_to or low
    return ", ".join(parts)


def served_runner(spec: Any, files: dict[str, Path], served: dict[str, Any], threads: int | None = None) -> Any:
    """In process, what the python backend serves for the choice ``served``: one engine, or several routed by
    batch size (``export.cpu_engines.BatchRouted``)."""
    from export.cpu_engines import BatchRouted

    return BatchRouted.build(routes_of(served), lambda r: cpu_runner(spec, files, r.engine, r.setting, threads,
                                                                      r.up_to), name=served_label(served))


def settled_interleaved(runners: dict[str, Any], feeds: dict[str, np.ndarray], rounds: int = ROUNDS,
                        warmup: int = 2, progress: Any = None, idle_after: dict[str, float] | None = None
                        ) -> dict[str, dict[str, float]]:
    """``export.timing.interleaved`` with every timed call settled (spinning engines are among the candidates),
    and an untimed pause after each spinning candidate (named ``... spin on``, ``candidate_key``) on top of
    ``idle_after``: its pool keeps the cores busy past the next runner's settling call."""
    from export.timing import BUSY_IDLE_S, interleaved

    idle = {k: BUSY_IDLE_S for k in runners if k.endswith("spin on")} | (idle_after or {})
    return interleaved(runners, feeds, rounds, warmup, settle=True, progress=progress, idle_after=idle)


# ---------------------------------------------------------------- gates


def _fail(why: str) -> dict[str, Any]:
    return {"passed": False, "why": why}


def openvino_fp32_gate(spec: Any, files: dict[str, Path], setting: str = "dynamic") -> dict[str, Any]:
    """OpenVINO fp32 held to the very parity gate onnxruntime's fp32 passed at export: against the torch model on
    real test images, every batch and input size of the spec's checks, the spec's per-output tolerance; per
    setting, since static and dynamic shapes compile different kernels."""
    from export.openvino_runner import OpenVinoCompileError
    from export.parity import check_parity
    from training.checkpoints import load_trained

    try:
        r = check_parity(spec, load_trained(spec.name), files, raise_on_fail=False,
                         runner=cpu_runner(spec, files, "openvino", setting))
    except OpenVinoCompileError as e:
        return _fail(str(e))
    return {"passed": not r.failures, "why": "; ".join(r.failures[:3]), "max_abs": r.worst,
            "cases": len(r.cases)}


def int8_gate(spec: Any, files: dict[str, Path], engine: str, n: int = GATE_IMAGES,
              reference: dict[str, np.ndarray] | None = None, setting: str = "spin off") -> dict[str, Any]:
    """The INT8 gate (agreement with the fp32 torch model, the task metric's drop) on ``engine``'s answers for
    the int8 graphs ``files``, run on this host (int8 kernels differ by instruction set: the recorded gate is
    another host's); a graph the engine cannot compile fails with its reason."""
    from export.fp16.gate import reference_outputs
    from export.int8.gate import measure, test_split
    from export.openvino_runner import OpenVinoCompileError
    from training.checkpoints import load_trained

    feeds, data = test_split(spec, n)
    try:
        runner = cpu_runner(spec, files, engine, setting)
        ref = reference if reference is not None else reference_outputs(spec, load_trained(spec.name), feeds)
        r = measure(spec, ref, files, feeds, data, runner=runner)
    except OpenVinoCompileError as e:
        return _fail(str(e))
    out = {k: r[k] for k in ("n", "agreements", "agreement", "metric", "fp32_metric", "int8_metric", "metric_drop",
                             "passed")}
    out["why"] = "; ".join(f.split(": ", 1)[-1] for f in r["failures"][:3])
    return out


def int8_reference(spec: Any, n: int = GATE_IMAGES) -> dict[str, np.ndarray]:
    """The fp32 torch model's outputs on the INT8 gate's ``n`` test images (shared by every engine's gate)."""
    from export.fp16.gate import reference_outputs
    from export.int8.gate import test_split
    from training.checkpoints import load_trained

    return reference_outputs(spec, load_trained(spec.name), test_split(spec, n)[0])


def fp16_kernels(engine: str) -> bool:
    """Whether ``engine`` computes fp16 natively on this CPU (onnxruntime's CPU kernels never do: they compute an
    fp16 graph in fp32 between Casts; OpenVINO does where the CPU reports FP16, e.g. AVX512-FP16 or AMX-FP16)."""
    if engine != "openvino":
        return False
    from export.openvino_runner import core

    return "FP16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def gate(spec: Any, engine: str, variant: str, files: dict[str, Path], n: int = GATE_IMAGES,
         reference: dict[str, np.ndarray] | None = None, setting: str = "spin off") -> dict[str, Any]:
    """Whether ``variant`` on ``engine`` with ``setting`` may be served on this host: ``{"passed", "why", ...}``.
    ``reference``: ``int8_reference(spec, n)``, computed once for every engine's int8 gate."""
    from export.variants import gates

    if variant == "fp16" and not fp16_kernels(engine):
        return _fail(f"{engine} has no fp16 kernels on this CPU (it would compute in fp32 between Casts)")
    if variant == "int8":
        return int8_gate(spec, files, engine, n, reference, setting)
    if engine == "onnxruntime":
        g = gates(spec.name)[variant]
        return {"passed": bool(g["passed"]), "why": g.get("why") or ("" if g["passed"] else "missed its gate "
                                                                      "(reports/parity|fp16|int8.json)"),
                "agreement": g.get("agreement")}
    if variant == "fp32":
        return openvino_fp32_gate(spec, files, setting)
    return _fail(f"no {variant} gate for {engine}")


# ---------------------------------------------------------------- the rule


def _served_cost(c: dict[str, Any], n: int, sizes: list[int]) -> float:
    """``c``'s time for a batch of ``n`` as served: static shapes pad up to the next timed bucket (that bucket's
    time); the others scale between the timed sizes (linear between the two around ``n``)."""
    x = c["crossing"]
    up = next(b for b in sizes if b >= n)
    if n == up or c["setting"] == "static":
        return x[str(up)]
    lo = max(b for b in sizes if b < n)
    return x[str(lo)] + (x[str(up)] - x[str(lo)]) * (n - lo) / (up - lo)


def _fastest_overall(pool: list[dict[str, Any]], batches: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """The candidate of ``pool`` with the lowest geometric mean p50 over ``batches``."""
    return min(pool, key=lambda c: math.fsum(math.log(c["p50"][str(b)]) for b in batches))


def _gain(ratios: list[float]) -> float:
    """Geometric mean of time ratios (old / new); inf where nothing moved."""
    return math.exp(math.fsum(map(math.log, ratios)) / len(ratios)) if ratios else math.inf


def routed(chosen: dict[str, Any], pool: list[dict[str, Any]], margin: float = MARGIN) -> dict[str, Any]:
    """``chosen`` with ``routes`` (``[{up_to, engine, setting}, {up_to: None, ...}]``) where splitting the batch
    sizes between two candidates of ``pool`` (one up to a timed size, another above) is faster than ``chosen``
    alone by more than ``margin``: the geometric mean of the time ratios over every batch size 1..32 it moves to
    another candidate, from the side-by-side ``crossing`` timings (``CROSSING_BATCHES``; a static-shape engine
    pays for its padding at the sizes between, ``_served_cost``), and again from the first timing at the sizes it
    moves there (1 or 32), each of which both timings must find faster: two measurements must agree. The
    fastest such split over all sizes wins. The routed result's ``p50`` (batch 1 and 32) and ``crossing`` are
    its routes' own. Returns ``chosen`` unchanged where no split pays, or the crossing was not timed."""
    sizes = sorted(int(b) for b in chosen.get("crossing", {}))
    key = ("engine", "variant", "setting")
    # chosen may be a copy of its pool entry (pick adds its score): the entry itself is chosen
    pool = [chosen if all(c[k] == chosen[k] for k in key) else c for c in pool
            if all(str(b) in c.get("crossing", {}) for b in sizes)]
    if len(sizes) < 2 or len(pool) < 2:
        return chosen
    every = range(1, sizes[-1] + 1)
    base = {n: _served_cost(chosen, n, sizes) for n in every}
    best, best_total = None, math.fsum(map(math.log, base.values()))
    for small in pool:
        for large in pool:
            for k in sizes[:-1] if small is not large else ():
                plan = {n: small if n <= k else large for n in every}
                cost = {n: _served_cost(c, n, sizes) for n, c in plan.items()}
                total = math.fsum(map(math.log, cost.values()))
                moved = [n for n, c in plan.items() if c is not chosen]
                # the gain must clear the noise in the crossing timings and, at the sizes the first timing also
                # measured (1 and 32), there too, with both timings faster at each such size: two measurements
                # agreeing, not one lucky phase
                both = [n for n in moved if str(n) in chosen["p50"]]
                first = [chosen["p50"][str(n)] / plan[n]["p50"][str(n)] for n in both]
                if moved and total < best_total and _gain([base[n] / cost[n] for n in moved]) > margin \
                        and _gain(first) > margin and all(r > 1 for r in first + [base[n] / cost[n] for n in both]):
                    best, best_total = (small, k, large), total
    if best is None:
        return chosen
    small, k, large = best
    routes = [{"up_to": k, "engine": small["engine"], "setting": small["setting"]},
              {"up_to": None, "engine": large["engine"], "setting": large["setting"]}]
    return {**chosen, "routes": routes,
            "crossing": {str(b): (small if b <= k else large)["crossing"][str(b)] for b in sizes},
            "p50": {b: (small if int(b) <= k else large)["p50"][b] for b in chosen["p50"]}}


def pick_variant(candidates: list[dict[str, Any]], variant: str, batches: tuple[int, ...] | list[int] = BATCHES,
                 margin: float = MARGIN, spin: str = "spin off") -> dict[str, Any] | None:
    """What serves ``variant`` on this host: the fp32 model's engine and setting (the project's default kept
    within ``margin``), or for another precision the fastest candidate that passed its gate here and beats the
    chosen fp32 at every batch (a variant slower than fp32 on this host is never served); None: nothing
    eligible. ``spin``: onnxruntime's spin setting as chosen by served measurement (``served_threading``); the
    in-process timing of the other setting does not decide it, since a served instance shares the cores."""
    candidates = [c for c in candidates if c["engine"] != "onnxruntime" or c["setting"] == spin]
    fp32 = pick([c for c in candidates if c["variant"] == "fp32"], batches, margin, ("onnxruntime", "fp32", spin))
    if fp32 is None:
        return None
    fp32 = routed(fp32, [c for c in candidates if c["variant"] == "fp32" and c.get("passed")], margin)
    if variant == "fp32":
        return fp32
    # faster than the (routed) fp32 model at every batch size both were timed at
    faster = [c for c in candidates if c["variant"] == variant and c.get("passed") and c.get("p50")
              and all(c["p50"][str(b)] < fp32["p50"][str(b)] for b in batches)
              and all(v < fp32["crossing"][b] for b, v in c.get("crossing", {}).items()
                      if b in fp32.get("crossing", {}))]
    if not faster:
        return None
    best = routed(_fastest_overall(faster, batches), faster, margin)
    return {**best, "speedup_vs_fp32": {str(b): fp32["p50"][str(b)] / best["p50"][str(b)] for b in batches}}


def candidate_key(engine: str, variant: str, setting: str) -> str:
    return f"{engine} {variant} {setting}"


def pick(candidates: list[dict[str, Any]], batches: tuple[int, ...] | list[int] = BATCHES,
         margin: float = MARGIN, default: tuple[str, str, str] = DEFAULT) -> dict[str, Any] | None:
    """The rule (module docstring, step 4) on measured candidates ``{engine, variant, setting, passed,
    p50: {batch: ms}}``; returns the chosen candidate (with ``score``) or None when none is eligible."""
    fp32 = {(c["engine"], c["setting"]): c for c in candidates if c["variant"] == "fp32" and c.get("p50")}
    timed = [c for c in candidates if c.get("p50")]
    best = {str(b): min(c["p50"][str(b)] for c in timed) for b in batches} if timed else {}

    def eligible(c: dict[str, Any]) -> bool:
        if not c.get("passed") or not c.get("p50"):
            return False
        if c["variant"] == "fp32":
            return True
        base = fp32.get((c["engine"], c["setting"]))
        return base is not None and base.get("passed", False) and \
            all(c["p50"][str(b)] < base["p50"][str(b)] for b in batches)

    scored = [{**c, "score": math.exp(np.mean([math.log(c["p50"][str(b)] / best[str(b)]) for b in batches]))}
              for c in timed if eligible(c)]
    if not scored:
        return None
    fastest = min(scored, key=lambda c: c["score"])
    kept = next((c for c in scored if (c["engine"], c["variant"], c["setting"]) == default), None)
    # Within the run's noise the project's default stays: a change of engine or precision must pay for itself.
    return kept if kept is not None and kept["score"] <= fastest["score"] * margin else fastest


# ---------------------------------------------------------------- measuring a model


def finalists(candidates: list[dict[str, Any]], batches: tuple[int, ...] | list[int] = BATCHES) -> list[str]:
    """Candidate keys worth timing at ``CROSSING_BATCHES``: per precision and onnxruntime spin setting (the served
    one is chosen later, by ``bench.served_threads``), where the fastest passed candidate at one of ``batches``
    is not the fastest at another, those fastest ones, the rule's pick and the project's default."""
    keys: dict[str, None] = {}
    for variant in dict.fromkeys(c["variant"] for c in candidates):
        for spin in settings("onnxruntime"):
            pool = [c for c in candidates if c["variant"] == variant and c.get("passed") and c.get("p50")
                    and (c["engine"] != "onnxruntime" or c["setting"] == spin)]
            if not pool:
                continue
            fastest = [min(pool, key=lambda c: c["p50"][str(b)]) for b in batches]
            if all(c is fastest[0] for c in fastest):
                continue
            geo = _fastest_overall(pool, batches)
            default = [c for c in pool if (c["engine"], c["setting"]) == ("onnxruntime", spin)]
            for c in (*fastest, geo, *default):
                keys[candidate_key(c["engine"], c["variant"], c["setting"])] = None
    return list(keys)



def measure_model(name: str, rounds: int = ROUNDS, gate_images: int = GATE_IMAGES,
                  batches: tuple[int, ...] = BATCHES, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from export.timing import batch_of
    from export.variants import variant_graphs
    from training.feeds import sample_feeds
    from training.registry import get_spec

    spec = get_spec(name)
    graphs = variant_graphs(spec)
    if "fp32" not in graphs:
        raise FileNotFoundError(f"no exported fp32 graph for {name!r} (run `make export`)")
    candidates: list[dict[str, Any]] = []
    runners: dict[str, Any] = {}
    reference = int8_reference(spec, gate_images) if "int8" in graphs else None
    for engine in engines():
        for variant, files in graphs.items():
            g = None
            for setting in settings(engine):
                # onnxruntime's threading does not change its numbers (one gate); OpenVINO's shapes may (one each)
                if g is None or engine != "onnxruntime":
                    g = gate(spec, engine, variant, files, gate_images, reference, setting)
                c = {"engine": engine, "variant": variant, "setting": setting, "passed": g["passed"],
                     "why": g.get("why", ""), "gate": g}
                candidates.append(c)
                # fp16 without kernels is not timed (its gate says why); everything else that compiles is, so
                # the table shows what a failed gate would have gained
                if variant == "fp16" and not fp16_kernels(engine):
                    continue
                try:
                    runners[candidate_key(engine, variant, setting)] = cpu_runner(spec, files, engine, setting)
                except Exception as e:
                    c["why"] = c["why"] or str(e).splitlines()[0]
    feeds = sample_feeds(spec, max(batches), spec.train.canvas)
    bar = tqdm(total=rounds * len(batches), desc=f"host choice {name}", disable=not progress, leave=False)
    stats: dict[str, dict[str, Any]] = {}
    for b in batches:
        x = batch_of(feeds, b)
        alive = {}
        for k, r in runners.items():  # a graph that compiles lazily (OpenVINO static shapes) may fail here
            try:
                r.infer(x)
                alive[k] = r
            except Exception as e:
                c = next(c for c in candidates if candidate_key(c["engine"], c["variant"], c["setting"]) == k)
                c["passed"], c["why"] = False, c["why"] or str(e).splitlines()[0]
        for k, s in settled_interleaved(alive, x, rounds, progress=bar).items():
            stats.setdefault(k, {})[str(b)] = s
    bar.close()
    for c in candidates:
        s = stats.get(candidate_key(c["engine"], c["variant"], c["setting"]))
        if s and len(s) == len(batches):
            c["latency"] = s
            c["p50"] = {b: v["p50"] for b, v in s.items()}
    # Engines that trade places between batch 1 and 32: the finalists timed side by side at every size between,
    # in a phase of their own (compared with each other only: the host's load moves between phases)
    routed_keys = finalists(candidates, batches)
    by_key = {candidate_key(c["engine"], c["variant"], c["setting"]): c for c in candidates}
    for b in tqdm(CROSSING_BATCHES if routed_keys else (), desc=f"crossings {name}", disable=not progress,
                  leave=False):
        x = batch_of(feeds, b)
        for k, st in settled_interleaved({k: runners[k] for k in routed_keys}, x, rounds).items():
            by_key[k].setdefault("crossing", {})[str(b)] = st["p50"]
    chosen = pick(candidates, batches)
    return {"model": name, "batches": list(batches), "crossing_batches": list(CROSSING_BATCHES), "method": METHOD,
            "rounds": rounds,
            "candidates": candidates,
            "digests": {v: _digest(f) for v, f in graphs.items()}, "versions": _versions(),
            "settings": {e: settings(e) for e in engines()},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "choice": None if chosen is None else {k: chosen[k] for k in ("engine", "variant", "setting", "score",
                                                                           "p50")}}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _current(entry: dict[str, Any], name: str) -> bool:
    from export.variants import variant_graphs
    from training.registry import get_spec

    graphs = variant_graphs(get_spec(name))
    return entry.get("versions") == _versions() and entry.get("settings") == {e: settings(e) for e in engines()} \
        and entry.get("crossing_batches") == list(CROSSING_BATCHES) and entry.get("method") == METHOD \
        and entry.get("digests") == {v: _digest(f) for v, f in graphs.items()}


def record(name: str, entry: dict[str, Any], path: Path | None = None) -> Path:
    from training.fingerprint import host_fingerprint

    path = path or cache_path()
    data = _load(path)
    data["isa_key"] = path.stem
    data["host"] = {k: v for k, v in host_fingerprint().items() if k in ("cpu", "machine", "cpu_capability",
                                                                         "cpu_flags", "isa_limits")}
    data.setdefault("models", {})[name] = entry
    data["models"] = dict(sorted(data["models"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def served_threading(host: dict[str, Any] | None = None, root: Path | None = None,
                     model: str | None = None) -> dict[str, Any] | None:
    """The spin-wait and instance count chosen by served measurement on this instruction set
    (``bench.served_threads``): ``model``'s own verdict, else the host-wide one, or None where it was not
    measured (then: spin off, the spec's instances)."""
    t = _load(cache_path(host, root)).get("served_threading")
    return None if t is None else t.get("models", {}).get(model or "", t)


def record_served_threading(verdict: dict[str, Any], path: Path | None = None) -> Path:
    """Record ``bench.served_threads``'s verdict for this host's instruction set."""
    path = path or cache_path()
    data = _load(path)
    data["isa_key"] = path.stem
    data["served_threading"] = {k: verdict[k] for k in ("chosen", "spinning", "instances", "models")} | \
        {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def choose(spec_name: str, host: dict[str, Any] | None = None, *, refresh: bool = False,
           root: Path | None = None, **measure_kw: Any) -> dict[str, Any]:
    """The engine, variant and threading to serve ``spec_name`` with on ``host`` (a ``host_fingerprint()``
    dict; default: this host), with the graph files and the measurement it came from.

    This host: the cached entry when current, else measured now and cached. Another host: its cached entry, or a
    ``LookupError`` saying to run ``python -m export.host_choice`` there (its speed cannot be measured from here).
    ``root``: the cache folder (default ``artifacts/host_choice``)."""
    from training.fingerprint import host_fingerprint

    here = host_fingerprint()
    path = cache_path(host, root)
    is_here = host is None or isa_key(host) == isa_key(here)
    entry = _load(path).get("models", {}).get(spec_name)
    if is_here and (refresh or entry is None or not _current(entry, spec_name)):
        entry = measure_model(spec_name, **measure_kw)
        record(spec_name, entry, path)
    if entry is None:
        raise LookupError(f"no host choice for {spec_name!r} on ISA {isa_key(host)} ({path}): run "
                          f"`python -m export.host_choice {spec_name}` on such a host")
    chosen = pick(entry["candidates"], entry["batches"])  # the rule as it is now, on the recorded measurements
    if chosen is None:
        raise LookupError(f"model {spec_name!r}: no variant passed its gate on ISA {path.stem}")
    from export.variants import variant_graphs
    from training.registry import get_spec

    c = {k: chosen[k] for k in ("engine", "variant", "setting", "score", "p50")}
    files = variant_graphs(get_spec(spec_name))[c["variant"]]
    threading = served_threading(host, root, spec_name)
    spin = "spin on" if threading and threading["spinning"] else "spin off"
    served = {v: None if (x := pick_variant(entry["candidates"], v, entry["batches"], spin=spin)) is None else
              {k: x[k] for k in ("engine", "setting", "routes", "p50", "crossing", "speedup_vs_fp32") if k in x}
              | {"instances": threading["instances"] if threading else None}
              for v in sorted({c["variant"] for c in entry["candidates"]})}
    return {"model": spec_name, "isa_key": path.stem, **c, "spinning": c["setting"] == "spin on",
            "graphs": {g: str(p) for g, p in files.items()}, "measured_at": entry["measured_at"], "cache": str(path),
            "served": served}


def render(entry: dict[str, Any]) -> str:
    from export.markdown import md_table

    rows = []
    choice = pick(entry["candidates"], entry["batches"])
    for c in entry["candidates"]:
        lat = c.get("latency", {})
        chosen = choice is not None and all(choice[k] == c[k] for k in ("engine", "variant", "setting"))
        rows.append([("**chosen** " if chosen else "") + candidate_key(c["engine"], c["variant"], c["setting"]),
                     "pass" if c["passed"] else f"FAIL: {c['why'][:200]}",
                     *[f"{lat[str(b)]['p50']:.2f} / {lat[str(b)]['p95']:.2f} / {lat[str(b)]['p99']:.2f}"
                       if str(b) in lat else "-" for b in entry["batches"]]])
    return md_table(["candidate", "gate on this host", *[f"batch {b} p50/p95/p99 ms" for b in entry["batches"]]],
                    rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.host_choice", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"])
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--gate-images", type=int, default=GATE_IMAGES)
    p.add_argument("--refresh", action="store_true", help="re-measure even when the cached entry is current")
    a = p.parse_args(argv)
    names = model_names(a.models)
    if names is None:
        return 2
    rc = 0
    for name in names:
        try:
            c = choose(name, refresh=a.refresh, rounds=a.rounds, gate_images=a.gate_images)
        except Exception as e:
            print(f"error: model {name!r}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            rc = 1
            continue
        entry = _load(Path(c["cache"]))["models"][name]
        print(f"\n{name}: {c['engine']} {c['variant']} ({c['setting']})\n{render(entry)}")
    print(f"\ncache: {cache_path()}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
