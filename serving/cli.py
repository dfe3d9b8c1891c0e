"""What every serving command does with an error it cannot handle, and ``attnzoo``, the one command line over
every stage's ``python -m`` main. No torch import here: the client stays light, and a subcommand imports only
the module it runs.

The benchmark subcommands run modules of the top-level ``bench`` package, which serving never imports: the table
names them as strings and ``_run`` imports one only when its subcommand runs. That is the one place the chain
training -> export -> serving -> bench is entered from its top, as a console script's entry point is (the
import walk in tests/test_imports.py sees no edge from serving to bench, and there is none at import time)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


def cli_error(exc: BaseException, debug: bool) -> int:
    """Print the one-line ``error: ...`` users see and return exit status 1; with --debug, re-raise
    so that the traceback shows."""
    if debug:
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------ attnzoo


@dataclass(frozen=True)
class Command:
    """One ``attnzoo`` subcommand: the ``python -m`` module it runs (imported only when it runs) and how that
    module spells model selection. On the command line models always come first, as names or ``all``."""

    module: str
    help: str
    models: str = "many"  # many | one | served (Triton model names: checked against the repository when many) | none
    flag: str | None = None  # how the module takes them: positional (None), "--models" or "--model"
    all_means: str = "pass"  # what `all` becomes: pass (the module takes it) | default (no names: its default)
    #                          | expand (every registered name)
    free_with: str | None = None  # with this option the names are not model names (checked by the module)


COMMANDS: dict[str, Command] = {
    "train": Command("training", "train models (or, with --data DIR, a family on your own images)",
                     free_with="--data"),
    "export": Command("export", "train what is missing, export ONNX, parity/FP16/int8 gates, TensorRT parse"),
    "repository": Command("serving.repository", "generate model_repository/ configs (--target cpu|gpu)",
                          all_means="default"),
    "engines": Command("export.engines", "build TensorRT engines (--archs sm86,...)"),
    "fp16": Command("export.fp16", "FP16 gate, drift probe and keep-list sweep (make fp16-report)"),
    "int8": Command("export.int8", "INT8 QDQ graphs: gate, or --probe/--tensorrt (make int8)"),
    "int8-bench": Command("bench.int8", "time int8 vs fp32 onnxruntime at batch 1 and 32 (into reports/int8.md)"),
    "roofline": Command("bench.int8_roofline", "int8 conv speed-up by channel width vs each model's widths"),
    "variants": Command("bench.variants", "time fp32/fp16/int8 per model, pick the fastest that passed"),
    "verify": Command("export.verify", "re-check one exported graph (checker, I/O, parity, TensorRT)", "one"),
    "sweep": Command("bench.sweep", "sweep one model parameter (--param P --values ...)", "one"),
    "gpu-check": Command("export.gpu_check", "TensorRT/ORT/torch parity and latency on a CUDA host"),
    "serve": Command("serving.stack", "serve: private tritonserver(s), supervised, behind the front door (HTTP 8000, "
                     "gRPC 8001); --replicas N: N behind Envoy", "served", "--models", "default"),
    "triton": Command("serving.server", "tritonserver alone on loopback ports (development, benchmarks)", "served",
                      "--models", "default"),
    "frontdoor": Command("serving.frontdoor", "the validating KServe v2 HTTP front door alone (port 8080)", "none"),
    "replicas": Command("serving.replicas", "serve with N private replicas behind Envoy (serve --replicas N, "
                        "default 2)", "served", "--models", "default"),
    "objectstore": Command("serving.objectstore", "push the model repository to object storage (s3://)", "none"),
    "prometheus": Command("serving.prometheus", "Prometheus scraping every replica and Envoy", "none"),
    "manifests": Command("serving.k8s", "Kubernetes (kustomize) and KServe manifests into deploy/", "none"),
    "infer": Command("serving.client", "send tensors, test images or files to a served model", "served",
                     "--model"),
    "bench": Command("bench.served", "Triton latency and throughput (reports/bench.md)", flag="--models",
                     all_means="default"),
    "bench-export": Command("bench.ort_vs_torch", "onnxruntime vs torch eager (reports/ort_vs_torch.md)"),
    "bench-images": Command("bench.images", "raw image files end to end (reports/images.md)",
                            all_means="expand"),
    "variants-served": Command("bench.variants_served", "served fp32 vs int8 at concurrency 1 and 16"),
    "pipeline-bench": Command("bench.pipeline", "composed models as ensemble vs BLS"),
    "gallery": Command("serving.gallery", "the same 8 images through every mechanism (reports/gallery.png)",
                       all_means="default"),
    "scaleout-bench": Command("bench.scaleout", "what Envoy costs and what replicas give (reports/scaleout.md)",
                              "none"),
    "reliability": Command("bench.reliability", "every bad input on every path, load, recovery", "none"),
    "study": Command("bench.studies", "a paper's measured claim, arms x seeds (STUDY name)", "none"),
    "sample-trees": Command("training.sample_trees", "write a small image tree to try --data on", "none"),
}

UNKNOWN_MODEL_EXIT = 2


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items())
    return (f"usage: attnzoo COMMAND [MODEL ... | all] [OPTIONS]\n\n"
            f"Train, export, compile and serve the attention zoo. Each command runs `python -m MODULE` (its alias);\n"
            f"`attnzoo COMMAND --help` shows its options. An unknown model name is one line and exit status "
            f"{UNKNOWN_MODEL_EXIT}.\n\ncommands:\n{rows}\n")


def _split_models(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading arguments that are not options are the model names; the rest goes to the module."""
    i = 0
    while i < len(argv) and not argv[i].startswith("-"):
        i += 1
    return argv[:i], argv[i:]


def _translate(name: str, cmd: Command, argv: list[str]) -> list[str] | int:
    """The module's argv for ``attnzoo name argv``, or an exit status when a model name is refused."""
    models, rest = _split_models(argv)
    if cmd.models == "none" or not models or (cmd.free_with and cmd.free_with in rest):
        return argv
    if cmd.models == "one":
        if models[0] == "all":
            print(f"error: attnzoo {name} takes one model name, not 'all'", file=sys.stderr)
            return UNKNOWN_MODEL_EXIT
        chosen, positional = models[:1], models[1:]
    elif cmd.models == "served":
        chosen, positional = (models[:1], models[1:]) if cmd.flag == "--model" else (models, [])
    else:
        chosen, positional = models, []
    if cmd.models != "served":
        from training.cli import model_names

        resolved = model_names(chosen)  # prints the one line for an unknown name
        if resolved is None:
            return UNKNOWN_MODEL_EXIT
        if chosen == ["all"]:
            chosen = {"pass": ["all"], "default": [], "expand": resolved}[cmd.all_means]
    elif chosen == ["all"] and cmd.all_means == "default":
        chosen = []
    elif cmd.flag == "--models":  # one server's models: registered or in its repository (a remote one is not ours)
        known = _servable(rest)
        unknown = [m for m in chosen if known is not None and m not in known]
        if unknown:
            print(f"error: unknown model {unknown[0]!r}; known models: {', '.join(sorted(known))}", file=sys.stderr)
            return UNKNOWN_MODEL_EXIT
    if cmd.flag is None:
        return [*chosen, *positional, *rest]
    return [*positional, *([cmd.flag, *chosen] if chosen else []), *rest]


def _servable(rest: list[str]) -> set[str] | None:
    """Names a local server can serve: every registered model and every model in its repository (``--repo``);
    None for a repository in object storage (``s3://...``: the server checks)."""
    from training import layout  # not serving.repository: it imports this module (cli_error)
    from training.registry import list_models

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--repo", default=None)
    repo = p.parse_known_args(rest)[0].repo
    if repo is not None and "://" in repo:
        return None
    return {*list_models(), *(c.parent.name for c in layout.repository_root(repo).glob(f"*/{layout.CONFIG_FILE}"))}


def _show_help(name: str, cmd: Command) -> int:
    spelled = {None: "given positionally", "--models": "passed as --models", "--model": "passed as --model"}
    if cmd.models != "none":
        what = "one model" if cmd.models == "one" or cmd.flag == "--model" else "model names or 'all'"
        print(f"attnzoo {name} [MODEL ...] [OPTIONS]: {cmd.help}.\nModels come first ({what}; {spelled[cmd.flag]} "
              f"to `python -m {cmd.module}`), then the options below.\n")
    return _run(cmd.module, ["--help"])


def _run(module: str, argv: list[str]) -> int:
    import importlib

    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # a package: its main lives in __main__.py
        mod = importlib.import_module(f"{module}.__main__")
    try:
        return mod.main(argv) or 0
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def main(argv: list[str] | None = None) -> int:
    """``attnzoo COMMAND ...``: the one console script (``[project.scripts]``); the ``python -m`` forms stay."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        return _show_help(name, cmd)
    translated = _translate(name, cmd, rest)
    if isinstance(translated, int):
        return translated
    return _run(cmd.module, translated)


if __name__ == "__main__":
    sys.exit(main())
