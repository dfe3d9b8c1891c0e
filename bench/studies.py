"""The zoo's measured claims: ``python -m bench.studies NAME [--seeds 0 1 2]`` (``make study STUDY=NAME``).

Each study names its arms (specs trained with one recipe) and the paper's claims checked against the seed
spread; see ``bench.study``. Not part of ``make export``: a study trains many models.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bench.study import Arm, Claim, Study, get_study, list_studies, register_study, run_study
from training.registry import ModelSpec, get_spec, list_models

GA_SUBSETS = {
    "1000": "E1 only: query-key content (Transformer)",
    "0010": "E3 only: key content",
    "0001": "E4 only: relative position",
    "0011": "E3 + E4",
    "0111": "E2 + E3 + E4",
    "1111": "all four terms",
}
NONLOCAL = ("gaussian", "embedded", "dot", "concat")


def _gen_attention(bits: str) -> ModelSpec:
    from training.models.generalized_attention import ablation_spec

    name = f"gen_attention_{bits}"
    # The served subsets are the registered specs (their shipped weights are seed 0's run).
    return get_spec(name) if name in list_models() else dataclasses.replace(ablation_spec(bits, 0), name=name)


@register_study("attention")
def attention_study() -> Study:
    ga = [Arm(f"GA {bits}", _gen_attention(bits), note) for bits, note in GA_SUBSETS.items()]
    nl = [Arm(f"NL {m}", get_spec(f"nonlocal_{m}"), f"non-local block, {m}") for m in NONLOCAL]
    return Study(
        name="attention",
        title="Spatial attention on cluttered digits: generalized attention term subsets, Non-local blocks, "
              "plain CNN",
        arms=(Arm("CNN", get_spec("cnn"), "plain small CNN (no attention block)"), *nl, *ga),
        claims=(
            Claim("Zhu et al.: query-key content (E1) plays a minor role (E2+E3+E4 ≈ all four)",
                  ("GA 0111",), ("GA 1111",), "similar"),
            Claim("Zhu et al.: key content + relative position beat Transformer's content-only attention",
                  ("GA 0011",), ("GA 1000",)),
            Claim("Zhu et al.: key content alone (E3) does at least as well as E1 alone",
                  ("GA 0010",), ("GA 1000",)),
            Claim("Wang et al.: a Non-local block improves its baseline (mean of the four)",
                  tuple(a.label for a in nl), ("CNN",)),
            Claim("generalized attention (all four terms) improves the plain CNN", ("GA 1111",), ("CNN",)),
        ),
        description="Every attention block sits in the same small CNN at 1/4 resolution (`training/models/`); "
                    "the GA and NL arms at seed 0 are the served models' shipped checkpoints when their "
                    "fingerprints match.",
    )


@register_study("residual_attention")
def residual_attention_study() -> Study:
    from training.models.residual_attention import variant_spec

    arms = (
        Arm("naive", variant_spec(use_mask=False, name="residual_attention_naive"),
            "the same trunks, no soft-mask branches (naive stacking)"),
        Arm("mixed", get_spec("residual_attention"), "(1 + M) * T, sigmoid mask (served)"),
        Arm("channel", variant_spec("channel", name="residual_attention_channel"),
            "(1 + M) * T, L2 over channels"),
        Arm("spatial", variant_spec("spatial", name="residual_attention_spatial"),
            "(1 + M) * T, standardised spatial maps"),
        Arm("mixed M*T", variant_spec(residual=False, name="residual_attention_mt"),
            "M * T: no attention residual learning"),
    )
    return Study(
        name="residual_attention",
        title="Residual Attention Network on cluttered digits: mask branches, normalisations, residual learning",
        arms=arms,
        claims=(
            Claim("Wang et al.: attention modules beat the same trunk without masks", ("mixed",), ("naive",)),
            Claim("Wang et al.: mixed attention beats channel attention", ("mixed",), ("channel",)),
            Claim("Wang et al.: mixed attention beats spatial attention", ("mixed",), ("spatial",)),
            Claim("Wang et al.: attention residual learning (1 + M) * T beats M * T", ("mixed",), ("mixed M*T",)),
        ),
        description="Two attention modules (mask depths 2 and 1) in the miniature network of "
                    "`training/models/residual_attention.py`; the served model is the mixed arm at seed 0.",
    )


@register_study("macnn")
def macnn_study() -> Study:
    from training.models.macnn import variant_spec

    return Study(
        name="macnn",
        title="MA-CNN on cluttered digits: 2 vs 4 parts",
        arms=(Arm("P=2", variant_spec(2, name="macnn_p2"), "two part maps"),
              Arm("P=4", get_spec("macnn"), "four part maps (served)")),
        claims=(Claim("more parts help (P = 4 beats P = 2)", ("P=4",), ("P=2",)),),
        also=("best_part_accuracy", "peak_distance", "map_overlap"),
        description="Beside the fused accuracy: the best single part's accuracy, the mean distance between part "
                    "peaks (image units) and the mean soft overlap between part maps, on the test split.",
    )


@register_study("attention_to_scale")
def attention_to_scale_study() -> Study:
    from training.models.attention_to_scale import NUM_CLASSES, variant_spec

    return Study(
        name="attention_to_scale",
        title="Attention to Scale on multi-scale digits: merging scales 1, 0.75, 0.5 by attention, average or max "
              "pooling, against one scale",
        arms=(Arm("attention", get_spec("attention_to_scale"), "per-pixel softmax over scales (served)"),
              Arm("average", variant_spec("average", name="attention_to_scale_average"), "average pooling"),
              Arm("max", variant_spec("max", name="attention_to_scale_max"), "max pooling"),
              Arm("single", variant_spec(scales=(1.0,), name="attention_to_scale_single"), "scale 1 only")),
        claims=(Claim("Chen et al.: attention to scale beats average pooling over scales", ("attention",),
                      ("average",)),
                Claim("Chen et al.: attention to scale beats max pooling over scales", ("attention",), ("max",)),
                Claim("Chen et al.: merging scales beats a single scale", ("attention",), ("single",))),
        metric="mean_iou",
        also=("pixel_accuracy", *(f"iou_{c}" for c in range(NUM_CLASSES))),
        description="Mean IoU over the 11 classes (background + 10 digits) on the multi-scale test split (1-3 "
                    "digits of 10-56 px per image); the per-class IoU columns are means over seeds (iou_0 is "
                    "the background, iou_k digit k - 1). Every multi-scale arm has the paper's extra supervision "
                    "(a cross-entropy per scale).",
    )


@register_study("feedback")
def feedback_study() -> Study:
    from training.models.feedback import variant_spec

    return Study(
        name="feedback",
        title="Feedback CNN on cluttered digits: does the feedback saliency point into the digit's box?",
        arms=(Arm("binary", get_spec("feedback"), "gates z <- z * [dS_k/dz > 0], 5 loops (the authors' code; served)"),
              Arm("sgd", variant_spec("sgd", 10, name="feedback_sgd"),
                  "SGD with momentum on -S_k + 0.01 L1(z), 10 steps (the public re-implementation)"),
              Arm("gradient", variant_spec(iters=0, name="feedback_gradient"),
                  "no feedback: the plain gradient saliency (abs dS_k/dx) of the same network")),
        claims=(Claim("Cao et al.: the feedback saliency localises better than the gradient saliency",
                      ("binary",), ("gradient",)),
                Claim("the SGD re-implementation's saliency localises better than the gradient saliency",
                      ("sgd",), ("gradient",))),
        metric="pointing_feedback",
        also=("pointing_gradient", "accuracy", "second_look_accuracy"),
        description="Pointing game: the share of test images whose saliency map has its maximum inside the "
                    "digit's box. The arms share the network and its training (an ordinary classifier, as in the "
                    "paper); only the inference differs, so each seed's three arms are the same weights.",
    )


@register_study("two_level")
def two_level_study() -> Study:
    spec = get_spec("two_level")
    return Study(
        name="two_level",
        title="Two-level attention on cluttered digits: object level, part level, both, and the DomainNet on the "
              "whole image",
        arms=(Arm("both", spec, "object + part level (served logits)", metric="acc_combined"),
              Arm("object", spec, "DomainNet averaged over the FilterNet-selected windows", metric="acc_object"),
              Arm("part", spec, "classifier on the clustered part detectors' best windows", metric="acc_part"),
              Arm("whole image", spec, "DomainNet on the whole canvas", metric="acc_whole_image")),
        claims=(Claim("Xiao et al.: combining both levels beats the object level alone", ("both",), ("object",)),
                Claim("Xiao et al.: combining both levels beats the part level alone", ("both",), ("part",)),
                Claim("Xiao et al.: object-level attention beats the DomainNet on the whole image", ("object",),
                      ("whole image",))),
        metric="accuracy",
        also=("selected_per_image", "selected_on_digit", "part_on_digit"),
        description="One pipeline is trained per seed; its arms are that run's levels (test accuracy of each "
                    "output). selected_per_image: windows the FilterNet selects; selected_on_digit / "
                    "part_on_digit: fraction of selected / part windows holding at least half of the digit box.",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.studies", description=__doc__)
    p.add_argument("study", nargs="?", help="study name (omit to list them)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the study's)")
    a = p.parse_args(argv)
    if a.study is None:
        print("\n".join(list_studies()))
        return 0
    try:
        study = get_study(a.study)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    results = run_study(study, tuple(a.seeds) if a.seeds else None)
    for arm in results["arms"]:
        print(f"{arm['label']:>12}: mean {100 * arm['mean']:.2f}  spread {100 * arm['range']:.2f}")
    for c in results["claims"]:
        print(f"- {c['text']}: {c['verdict']}")
    print(f"report: reports/study_{study.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
