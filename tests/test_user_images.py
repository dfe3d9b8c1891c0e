"""A user's own images, end to end as a user runs it: generate a tree (ImageFolder and CUB layouts, JPEG and
PNG, 60-500 px, grayscale/palette/RGBA files, one corrupt file), ``python -m training FAMILY --data``,
``python -m export NAME``, ``python -m serving.repository NAME``, a real tritonserver, and the files' bytes over
gRPC and HTTP to ``NAME_image``: equal to the torch model on the training code's eval transform."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import early, early_process, stop_in_background
from training.sample_trees import write_cub_tree, write_folder_tree

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("grpc", "http")

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# (layout, family, steps): a few hundred steps of the small CNN on a folder tree, RA-CNN (a CUB model, boxes
# kept) on a CUB tree. Export flags: RA-CNN after 120 steps has near-tied scale logits, and its FP16 graph
# misses the 0.995 agreement bar (measured 0.986) - a gate doing its job, not the image path under test here.
CASES = {"folder": ("cnn", 300, ()), "cub": ("racnn", 120, ("--skip-fp16",))}


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "ATTNZOO_USER_MODELS": str(tmp / "user_models"), "ATTNZOO_REPOSITORY": str(tmp / "repo"),
            "ATTNZOO_REPORTS": str(tmp / "reports"), "ATTNZOO_ARTIFACTS": str(tmp / "artifacts")}


def _check(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"{' '.join(p.args[1:])}: rc {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return _check(subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=900))


def _deploy(layout: str) -> tuple[str, Path, dict[str, str], Path]:
    """Generate the tree, train (refused on the corrupt file, then with --skip-bad-images), export and write the
    repository, as a user runs it; returns (name, tree, env, tmp)."""
    family, steps, export_flags = CASES[layout]
    tmp = Path(tempfile.mkdtemp(prefix=f"attnzoo-user-{layout}-"))
    tree = (write_cub_tree(tmp / "tree", per_class=30, corrupt=True) if layout == "cub"
            else write_folder_tree(tmp / "tree", per_class=30, corrupt=True))
    env = _env(tmp)
    name = f"shapes_{layout}"
    train = [*"-m training".split(), family, "--data", str(tree), "--name", name, "--steps", str(steps)]
    refused = early_process(train, env)  # the corrupt file stops training, named, in one line
    assert refused.returncode == 2 and "broken" in refused.stderr and "--skip-bad-images" in refused.stderr
    assert "Traceback" not in refused.stderr
    trained = _check(early_process([*train, "--skip-bad-images"], env))
    assert "skipped 1 bad image" in trained.stderr and "broken" in trained.stderr
    _check(early_process(["-m", "export", name, "--skip-int8", *export_flags], env))  # the parity gate
    _check(early_process(["-m", "serving.repository", name], env))
    return name, tree, env, tmp


def start_early() -> None:
    """The trees are trained and exported in the background from the session's start (tests/conftest.py)."""
    for layout in sorted(CASES):
        early(f"user-images-{layout}", lambda layout=layout: _deploy(layout))


@pytest.fixture(scope="module", params=sorted(CASES))
def deployed(request):
    """A model trained, exported and put in a repository for one layout; yields (name, tree, env, spec, model)."""
    layout = request.param
    name, tree, env, tmp = early(f"user-images-{layout}", lambda: _deploy(layout)).result()

    from training.derived import derive_spec
    from training.registry import get_spec

    info = json.loads((tmp / "user_models" / f"{name}.spec.json").read_text())
    spec = derive_spec(get_spec(CASES[layout][0]), info)
    model = spec.builder()
    model.load_state_dict(torch.load(tmp / "user_models" / f"{name}.pt", weights_only=True))
    yield name, tree, env, spec, model.eval(), tmp


def test_spec_is_saved_beside_the_weights_and_learns(deployed):
    name, _, _, spec, _, tmp = deployed
    info = json.loads((tmp / "user_models" / f"{name}.spec.json").read_text())
    assert info["classes"] == list(spec.class_names) and len(info["mean"]) == 3 and info["data_digest"]
    assert spec.inputs[0].axes[0] == 3 and spec.outputs[0].axes == (len(info["classes"]),)
    record = json.loads((tmp / "user_models" / f"{name}.json").read_text())
    assert record["metrics"]["accuracy"] >= 0.6, record["metrics"]  # 4 classes: chance is 0.25
    parity = json.loads((tmp / "reports" / "parity.json").read_text())
    assert parity[name]["parity_max_abs"] <= 1e-4


def _served(name: str, env: dict[str, str]):
    from serving.server import TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    return TritonServer(Path(env["ATTNZOO_REPOSITORY"]), [name, f"{name}_preprocess", f"{name}_image"],
                        http_port=http, grpc_port=grpc, metrics_port=metrics)


@pytest.fixture(scope="module")
def served(deployed):
    """One tritonserver per layout, shared by the two tests below (they only infer, and the second asserts it
    stays healthy); a server of its own, not the session's: the repository is this layout's temp one."""
    name, _, env, _, _, _ = deployed
    server = _served(name, env).start()
    yield server
    stop_in_background(server, f"test_user_images.py served {name}")


def _files(tree: Path) -> list[Path]:
    files = sorted(p for p in tree.rglob("*") if p.suffix in (".jpg", ".png") and "broken" not in p.name)
    return files[::7][:20]


def test_served_image_model_equals_torch_on_the_eval_transform(deployed, served):
    from serving.client import Client, classify_files, file_batch

    name, tree, env, spec, model, _ = deployed
    pre = spec.image_preprocess()
    files = _files(tree)
    x = np.stack([pre(f.read_bytes(), source=str(f)) for f in files])
    with torch.no_grad():
        ref = {o.name: t.numpy() for o, t in zip(spec.outputs, model(torch.from_numpy(x)), strict=True)}
    labels = spec.class_names
    for protocol in PROTOCOLS:
        url = served.grpc_url if protocol == "grpc" else served.http_url
        decoded = Client(f"{name}_preprocess", protocol, url).infer(file_batch(files))
        assert np.abs(decoded[spec.inputs[0].name] - x).max() <= 1e-6, protocol
        image = Client(f"{name}_image", protocol, url)
        got = image.infer(file_batch(files))
        for o in spec.outputs:
            assert np.abs(got[o.name] - ref[o.name]).max() <= 1e-4, (protocol, o.name)
        assert (got["logits"].argmax(-1) == ref["logits"].argmax(-1)).all()
        top = classify_files(image, files, top=2)
        for r, logits in zip(top, ref["logits"], strict=True):
            (score, index, label), _ = r["logits"]
            assert index == int(logits.argmax()) and label == labels[index]
            assert abs(score - float(logits.max())) <= 1e-4
    out = _run(["-m", "serving.client", "--model", name, "--url", served.grpc_url, str(files[0])], env)
    assert labels[int(ref["logits"][0].argmax())] in out.stdout.splitlines()[1]


def test_bad_files_get_their_own_error_and_the_server_stays_ready(deployed, served, tmp_path):
    from PIL import Image

    from serving.client import Client, InferenceError, file_batch

    name, tree, _, _, _, _ = deployed
    good = _files(tree)[0].read_bytes()
    bomb = tmp_path / "bomb.png"
    Image.new("L", (8000, 6000)).save(bomb)  # 48 MP of zeros: a small file, above the 40 MP limit
    bad = {"not an image": b"GIF89a but not really", "empty payload": b"", "above the limit": bomb.read_bytes(),
           "cannot decode": good[: len(good) // 3]}
    for protocol in PROTOCOLS:
        url = served.grpc_url if protocol == "grpc" else served.http_url
        client = Client(f"{name}_image", protocol, url)
        batches = [file_batch([good])] + [file_batch([b]) for b in bad.values()] + [file_batch([good, good])]
        results = client.infer_many(batches, concurrency=len(batches), return_errors=True)
        assert not isinstance(results[0], Exception) and not isinstance(results[-1], Exception)
        assert results[-1]["logits"].shape[0] == 2
        for (why, _), r in zip(bad.items(), results[1:-1], strict=True):
            assert isinstance(r, InferenceError), why
            assert "element 0" in str(r) and (why in str(r) or why == "cannot decode"), str(r)
            assert r.status in ("400", "StatusCode.INVALID_ARGUMENT"), r.status
        with pytest.raises(InferenceError):
            client.infer(file_batch([b"x"]))
    assert all(v is None for v in served.health().values())
