"""The Kubernetes and KServe manifests (deploy/, from serving.k8s): committed as generated, rendered by
``kubectl kustomize``, valid against two Kubernetes versions' strict schemas (kubernetes-validate) and KServe's
CRD schemas (jsonschema), carrying the choices they are there for; and broken copies of them fail.

No cluster runs here: this is what can be checked offline."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving import k8s
from training import paths

DEPLOY = paths.REPO_ROOT / "deploy"
KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu")
K8S_VERSIONS = ("1.32.0", "1.37.0")  # kubernetes-validate 1.37.0 bundles 1.25-1.37


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return k8s.generate()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations offline)")
    out = {}
    for name in KUSTOMIZATIONS:
        r = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / name)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, f"kubectl kustomize {name}: {r.stderr.strip()}"
        out[name] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return out


def _kserve_docs() -> list[dict]:
    return [d for f in sorted((DEPLOY / "kserve").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def k8s_errors(obj: dict, version: str) -> str | None:
    """None if ``obj`` is valid for Kubernetes ``version`` (strict: unknown fields fail), else why not. A kind or
    apiVersion without a schema is an error (the CLI would only warn and exit 0)."""
    import kubernetes_validate as kv

    try:
        kv.validate(obj, version, strict=True)
    except kv.SchemaNotFoundError:
        return f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {version}"
    except kv.ValidationError as e:
        return f"{obj.get('kind')}: {e.message} at {'.'.join(map(str, e.path))}"
    return None


def _strict(schema: Any) -> Any:
    """A CRD schema that, like the API server's strict field validation, refuses fields it does not declare."""
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], Any]:
    import jsonschema

    out = {}
    for f in sorted((DEPLOY / k8s.SCHEMAS_DIR).glob("*.json")):
        schema = json.loads(f.read_text())
        gvk = schema.pop("x-group-version-kind")
        out[(f"{gvk['group']}/{gvk['version']}", gvk["kind"])] = jsonschema.Draft7Validator(_strict(schema))
    return out


def crd_errors(obj: dict, validators: dict) -> str | None:
    v = validators.get((obj.get("apiVersion"), obj.get("kind")))
    if v is None:
        return f"no vendored CRD schema for {obj.get('apiVersion')} {obj.get('kind')}"
    err = next(iter(sorted(v.iter_errors(obj), key=lambda e: list(e.path))), None)
    return None if err is None else f"{obj['kind']}: {err.message} at {'.'.join(map(str, err.path))}"


def _find(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind)


def _containers(docs: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in _find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]}


# ------------------------------------------------------------------------------------------- generated


def test_committed_tree_is_what_the_specs_generate(generated: dict[str, str]) -> None:
    from training.derived import user_spec_files

    if user_spec_files():  # registered too, and deployed by `make manifests`; the committed tree is the zoo's
        pytest.skip(f"models derived for your images are registered ({paths.USER_MODELS_DIR})")
    diffs = k8s.check(DEPLOY, generated)
    assert not diffs, "deploy/ differs from the specs (run `make manifests`):\n" + "".join(diffs)[:3000]


def test_sizing_covers_the_generated_repository() -> None:
    """The specs' count of Triton models is the repository's (less the optional int8/TensorRT variants)."""
    from serving.repository import VARIANT_SUFFIXES, served_models

    served = [m for m in served_models() if not m.endswith(VARIANT_SUFFIXES)]
    if not served:
        pytest.skip("model_repository/ is not generated (make export)")
    s = k8s.sizing()
    assert s.models == len(served)
    assert 0 < s.stubs["gpu"] < s.stubs["cpu"] <= s.models  # the native backends need no stubs
    assert s.largest_request_bytes > 0


# ------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_are_valid(rendered: dict[str, list[dict]], version: str) -> None:
    kinds = set()
    for name, docs in rendered.items():
        for d in docs:
            kinds.add(d["kind"])
            assert k8s_errors(d, version) is None, f"{name}: {k8s_errors(d, version)}"
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                     "ServiceAccount"}


def test_kserve_objects_are_valid(crd_validators: dict) -> None:
    docs = _kserve_docs()
    assert {d["kind"] for d in docs} == {"ServingRuntime", "InferenceService", "Secret", "ServiceAccount"}
    for d in docs:
        if d["apiVersion"].startswith("serving.kserve.io/"):
            assert crd_errors(d, crd_validators) is None, crd_errors(d, crd_validators)
        else:
            for version in K8S_VERSIONS:
                assert k8s_errors(d, version) is None


# --------------------------------------------------------------------------------------- broken copies


def _broken_copies(docs: list[dict]) -> dict[str, dict]:
    dep, hpa = _find(docs, "Deployment"), _find(docs, "HorizontalPodAutoscaler")
    wrong_type = copy.deepcopy(dep)
    wrong_type["spec"]["replicas"] = "two"
    no_port = copy.deepcopy(dep)
    frontdoor = next(c for c in no_port["spec"]["template"]["spec"]["containers"] if c["name"] == "frontdoor")
    del frontdoor["readinessProbe"]["httpGet"]["port"]
    unknown_field = copy.deepcopy(dep)
    unknown_field["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimt"] = "1Gi"
    removed_api = copy.deepcopy(hpa)
    removed_api["apiVersion"] = "autoscaling/v2beta2"  # what NVIDIA's k8s-onprem chart renders; gone since 1.26
    unknown_kind = copy.deepcopy(hpa)
    unknown_kind["kind"] = "HorizontalPodScaler"
    return {"wrong type": wrong_type, "missing probe port": no_port, "unknown field": unknown_field,
            "removed apiVersion": removed_api, "unknown kind": unknown_kind}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_broken_manifests_fail(rendered: dict[str, list[dict]], version: str) -> None:
    expected = {"wrong type": "'two' is not of type", "missing probe port": "'port' is a required property",
                "unknown field": "'sizeLimt' was unexpected", "removed apiVersion": "no schema for autoscaling/v2beta2",
                "unknown kind": "no schema for autoscaling/v2 HorizontalPodScaler"}
    for what, obj in _broken_copies(rendered["overlays/gpu"]).items():
        err = k8s_errors(obj, version)
        assert err is not None and expected[what] in err, f"{what}: {err}"


def test_removed_apiversion_is_only_caught_by_the_current_schemas(rendered: dict[str, list[dict]]) -> None:
    """autoscaling/v2beta2 still validates against Kubernetes 1.25: the version pins are what catch it."""
    assert k8s_errors(_broken_copies(rendered["base"])["removed apiVersion"], "1.25.0") is None


def test_broken_kserve_objects_fail(crd_validators: dict) -> None:
    docs = _kserve_docs()
    isvc, runtime = _find(docs, "InferenceService"), _find(docs, "ServingRuntime")
    cases = []
    b = copy.deepcopy(isvc)
    b["spec"]["predictor"]["minReplicas"] = "one"
    cases.append((b, "'one' is not of type 'integer'"))
    b = copy.deepcopy(isvc)
    b["spec"]["predictor"]["model"]["storageURI"] = b["spec"]["predictor"]["model"].pop("storageUri")
    cases.append((b, "'storageURI' was unexpected"))
    b = copy.deepcopy(isvc)
    del b["spec"]["predictor"]["model"]["modelFormat"]["name"]
    cases.append((b, "'name' is a required property"))
    b = copy.deepcopy(runtime)
    b["spec"]["containers"][0]["ports"] = [{"name": "h2c"}]
    cases.append((b, "'containerPort' is a required property"))
    b = copy.deepcopy(runtime)
    b["apiVersion"] = "serving.kserve.io/v1beta1"
    cases.append((b, "no vendored CRD schema"))
    for obj, want in cases:
        err = crd_errors(obj, crd_validators)
        assert err is not None and want in err, f"expected {want!r}, got {err!r}"


# ----------------------------------------------------------------------------------------- what they say


def test_pod_exposes_only_the_front_door(rendered: dict[str, list[dict]]) -> None:
    p = k8s.ports()
    for name, docs in rendered.items():
        svc = _find(docs, "Service")
        assert [(x["port"], x["targetPort"]) for x in svc["spec"]["ports"]] == [(80, "http")], name
        c = _containers(docs)
        assert c["frontdoor"]["ports"][0] == {"name": "http", "containerPort": p.frontdoor, "protocol": "TCP"}
        assert f"--triton-grpc=127.0.0.1:{p.grpc}" in c["frontdoor"]["args"]
        args = c["triton"]["args"]
        assert "--http-address=127.0.0.1" in args and "--grpc-address=127.0.0.1" in args, name
        assert [x["containerPort"] for x in c["triton"]["ports"]] == [p.metrics]
        assert any(a.startswith("--http-restricted-api=") and "$(ATTNZOO_TRITON_ADMIN_KEY)" in a for a in args)


def test_probes_shm_and_security(rendered: dict[str, list[dict]]) -> None:
    s = k8s.sizing()
    for name, docs in rendered.items():
        pod = _find(docs, "Deployment")["spec"]["template"]["spec"]
        c = _containers(docs)
        ready = c["frontdoor"]["readinessProbe"]["httpGet"]
        assert (ready["path"], ready["port"]) == ("/v2/health/ready", "http"), name  # probes with real inference
        assert "/v2/health/live" in c["triton"]["livenessProbe"]["exec"]["command"][-1]
        startup = c["triton"]["startupProbe"]
        assert "/v2/health/ready" in startup["exec"]["command"][-1]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= s.startup_s()
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        target = "gpu" if name.endswith("gpu") else "cpu"
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{s.shm_mib(target)}Mi"}, name
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["triton"]["volumeMounts"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for ctr in [*pod["containers"], *pod.get("initContainers", [])]:
            sc = ctr.get("securityContext", {})
            assert sc.get("capabilities") == {"drop": ["ALL"]} and sc.get("allowPrivilegeEscalation") is False, \
                f"{name}/{ctr['name']}"
            assert "memory" in ctr["resources"]["limits"], f"{name}/{ctr['name']}"


def test_hpa_scales_on_the_recorded_signals(rendered: dict[str, list[dict]]) -> None:
    hpa = _find(rendered["base"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods", "Pods"]
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "adapter.yaml").read_text())["rules"]["custom"]
    recorded = {r["record"] for g in yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
                for r in g["rules"] if "record" in r}
    published = {a["name"]["as"]: a["seriesQuery"].split("{")[0] for a in adapter}
    for n in names:
        assert n in published and published[n] in recorded, n


def test_overlays(rendered: dict[str, list[dict]]) -> None:
    cpu, gpu = _containers(rendered["overlays/cpu"]), _containers(rendered["overlays/gpu"])
    assert cpu["triton"]["image"].startswith(k8s.IMAGE["cpu"]) and gpu["triton"]["image"].startswith(k8s.IMAGE["gpu"])
    assert "nvidia.com/gpu" not in cpu["triton"]["resources"]["limits"]
    assert gpu["triton"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in gpu["triton"]["env"]}
    assert env["TRITON_BACKEND_DIRECTORY"] == "/opt/tritonserver/backends"  # NVIDIA's image's native backends
    init = _find(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    script = init["command"][-1]
    assert "python -m export.engines" in script and "python -m serving.repository --target gpu" in script
    assert init["resources"]["limits"]["nvidia.com/gpu"] == "1"  # engines for the GPU this pod gets
    assert f"FROM {k8s.NVIDIA_IMAGE}" in (DEPLOY / "containers" / "Containerfile.gpu").read_text()


def test_commands_exist() -> None:
    """Every flag the manifests pass to the project's commands is one they take (their --help), and every
    tritonserver flag is one pip's tritonserver 2.51 takes."""
    import sys

    from serving.server import prepare_runtime, server_env, tritonserver_bin

    docs = [d for f in ("deployment.yaml",) for d in yaml.safe_load_all((DEPLOY / "k8s/base" / f).read_text())]
    c = _containers(docs)
    helps = {}
    for module in ("serving.frontdoor", "serving.repository", "export.engines"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        helps[module] = r.stdout
    for arg in c["frontdoor"]["args"]:
        assert arg.split("=")[0] in helps["serving.frontdoor"], arg
    for flag in ("--precision", "--deploy"):
        assert flag in helps["export.engines"]
    for flag in ("--target", "--repo"):
        assert flag in helps["serving.repository"]
    r = subprocess.run([str(tritonserver_bin()), "--help"], capture_output=True, text=True, timeout=60,
                       env=server_env(prepare_runtime()))
    runtime = _find(_kserve_docs(), "ServingRuntime")["spec"]["containers"][0]
    assert "--http-address=127.0.0.1" in runtime["args"]  # the transformer is the way in, over gRPC
    for arg in [*c["triton"]["args"], *runtime["args"]]:
        assert arg.split("=")[0] in r.stdout + r.stderr, f"tritonserver 2.51 has no {arg.split('=')[0]}"


def test_cli_check(tmp_path: Path, generated: dict[str, str]) -> None:
    """``--check`` passes on a fresh tree and names the file that drifted."""
    k8s.write(tmp_path, generated)
    assert k8s.main(["--out", str(tmp_path), "--check"]) == 0
    hpa = tmp_path / "k8s/base/hpa.yaml"
    hpa.write_text(hpa.read_text().replace("maxReplicas: 8", "maxReplicas: 9"))
    assert k8s.check(tmp_path, generated)[0].startswith(f"--- {hpa} (on disk)")
    assert k8s.main(["--out", str(tmp_path), "--check"]) == 1


# ------------------------------------------------------------------------------------------ run here


def _local(arg: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        arg = arg.replace(old, new)
    return arg


@pytest.mark.server
def test_pod_commands_serve_here(tmp_path: Path) -> None:
    """The base pod's two commands, as the manifest writes them, run with pip's tritonserver and the front door on
    this host (loopback, free ports, a one-model repository): the startup and liveness probes' commands pass, the
    readiness path answers 200, and Triton exports every metric the Prometheus rules read."""
    import os
    import secrets
    import signal
    import sys
    import time
    import urllib.request

    from serving.repository import FLOOR_MODEL
    from serving.server import free_ports, prepare_runtime, server_env, tritonserver_bin
    from training import layout

    src = layout.model_dir(FLOOR_MODEL)
    if not (src / layout.CONFIG_FILE).exists():
        pytest.skip("model_repository/ is not generated (make export)")
    repo = tmp_path / "models"
    shutil.copytree(src, repo / FLOOR_MODEL, ignore=shutil.ignore_patterns("__pycache__"))
    docs = list(yaml.safe_load_all((DEPLOY / "k8s/base/deployment.yaml").read_text()))
    c, p = _containers(docs), k8s.ports()
    http, grpc, metrics, front = free_ports(4)
    runtime = prepare_runtime()
    prefix = f"attnzoo_k8s_{os.getpid()}_"
    subs = {"$(TRITON_BACKEND_DIRECTORY)": str(runtime / "backends"), "$(TRITON_GPU_METRICS)": "false",
            "$(ATTNZOO_TRITON_ADMIN_KEY)": secrets.token_urlsafe(16), k8s.MODELS_DIR: str(repo),
            "0.0.0.0": "127.0.0.1", f"port={p.http}": f"port={http}", f"port={p.grpc}": f"port={grpc}",
            f"port={p.metrics}": f"port={metrics}", f"127.0.0.1:{p.http}/": f"127.0.0.1:{http}/",
            f"127.0.0.1:{p.grpc}": f"127.0.0.1:{grpc}", f"port={p.frontdoor}": f"port={front}"}
    # This host's /dev/shm is shared (a pod's is its own): name this server's regions.
    triton_cmd = [str(tritonserver_bin()), *(_local(a, subs) for a in c["triton"]["args"]),
                  f"--backend-config=python,shm-region-prefix-name={prefix}"]
    front_cmd = [sys.executable, "-m", "serving.frontdoor", *(_local(a, subs) for a in c["frontdoor"]["args"])]
    assert f"--port={front}" in front_cmd and "--metrics-address=127.0.0.1" in triton_cmd
    procs = []
    try:
        for cmd, env in ((triton_cmd, server_env(runtime)), (front_cmd, None)):
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=env, start_new_session=True))

        def probe(p: dict) -> bool:
            cmd = [_local(a, subs) for a in p["exec"]["command"]]
            return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

        deadline = time.monotonic() + 90
        while not probe(c["triton"]["startupProbe"]):
            assert procs[0].poll() is None, "tritonserver exited with the manifest's flags"
            assert time.monotonic() < deadline, "the startup probe never passed"
            time.sleep(0.5)
        assert probe(c["triton"]["livenessProbe"])
        ready = f"http://127.0.0.1:{front}{c['frontdoor']['readinessProbe']['httpGet']['path']}"
        while True:
            try:
                assert urllib.request.urlopen(ready, timeout=5).status == 200
                break
            except OSError:
                assert procs[1].poll() is None and time.monotonic() < deadline, "the front door never got ready"
                time.sleep(0.5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
        used = {m for m in ("nv_inference_queue_duration_us", "nv_inference_request_success",
                            "nv_inference_request_failure", "nv_inference_pending_request_count") if m in rules}
        assert len(used) == 4
        for m in used:  # a loaded model's counters exist before its first request (AttnzooModelsNotLoaded)
            assert re.search(rf'^{m}{{[^}}]*model="{FLOOR_MODEL}"[^}}]*}} \d+$', text, re.M), f"no {m} in {text[:2000]}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for region in Path("/dev/shm").glob(f"{prefix}*"):
            region.unlink(missing_ok=True)
