"""bench.cpuid_mask: a process tree held to AVX2 by CPUID faulting, run for real (every library in the held
processes, torch, OpenVINO and onnxruntime, sees an AVX2 CPU; other segfaults still kill; a process that cannot be
held refuses to start)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bench import cpuid_mask
from training.fingerprint import ISA_LIMIT_VARS, cpu_kernel_flags

REASON = cpuid_mask.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cannot hold this host by CPUID: {REASON}")


def _py(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def held_env() -> dict[str, str]:
    return cpuid_mask.environment()


@pytest.fixture(scope="module")
def unheld_env() -> dict[str, str]:
    """The CPU as it is, also when this suite itself runs held (``python -m bench.cpuid_mask -- make test``)."""
    return cpuid_mask.unheld_environment()


def test_held_libraries_see_avx2(held_env, unheld_env) -> None:
    # the CPU as it is: no ISA limit at all (the README's recipe may run this suite under ATEN_CPU_CAPABILITY)
    bare = {k: v for k, v in unheld_env.items() if k not in ISA_LIMIT_VARS}
    held, here = cpuid_mask.seen(held_env), cpuid_mask.seen(bare)
    assert held["torch"] == "AVX2"
    assert "FP32" in held["openvino"] and "BF16" not in held["openvino"]
    if "avx512_bf16" in cpu_kernel_flags():  # what the mask takes away, seen unheld
        assert here["torch"] == "AVX512" and "BF16" in here["openvino"]


def test_execed_children_are_held_too(held_env) -> None:
    """Faulting is reset by execve; the inherited LD_PRELOAD holds the child again (tritonserver, its stubs)."""
    code = (f"import subprocess, sys; subprocess.run([sys.executable, '-c', {cpuid_mask._SEEN!r}], check=True)")
    out = _py(code, held_env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["torch"] == "AVX2"


def test_fingerprint_records_the_mask(held_env, unheld_env) -> None:
    code = ("import json; from training.fingerprint import host_fingerprint; from export.host_choice import isa_key;"
            "h = host_fingerprint(); print(json.dumps([h['cpu_capability'], h['isa_limits'], isa_key(h)]))")
    seen = {}
    for label, env in (("held", held_env), ("unheld", unheld_env)):
        out = _py(code, env)
        assert out.returncode == 0, out.stderr
        seen[label] = json.loads(out.stdout.strip().splitlines()[-1])
    capability, limits, key = seen["held"]
    assert capability == "AVX2" and limits.get("CPUID_MASK") == "avx2" and "-avx2-" in key
    assert "CPUID_MASK" not in seen["unheld"][1] and key != seen["unheld"][2]


def test_onnxruntime_answers_the_same_held(held_env, unheld_env, tmp_path) -> None:
    """The same graph on the AVX2 kernels: fp32 within 1e-4; int8 exactly with 7-bit weights (what the shipped
    int8 graphs use), and, on a VNNI host, other integers with full 8-bit weights: AVX2's u8 x s8 kernel
    (vpmaddubsw) saturates pairs of products at int16, VNNI's does not. That difference shows onnxruntime's MLAS
    really took its AVX2 kernel."""
    import onnx
    from onnx import TensorProto, helper

    n = 96
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"]), helper.make_node("MatMulInteger", ["qa", "qb"], ["qc"]),
         helper.make_node("MatMulInteger", ["qa", "qb7"], ["qc7"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("qa", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("qb", TensorProto.INT8, [n, n]),
         helper.make_tensor_value_info("qb7", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("qc", TensorProto.INT32, [n, n]),
         helper.make_tensor_value_info("qc7", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "g.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "feed.npz", a=rng.standard_normal((n, n), dtype=np.float32),
             b=rng.standard_normal((n, n), dtype=np.float32), qa=rng.integers(0, 256, (n, n), dtype=np.uint8),
             qb=rng.integers(-127, 128, (n, n), dtype=np.int8), qb7=rng.integers(-64, 64, (n, n), dtype=np.int8))
    code = (f"import numpy as np, onnxruntime as ort; f = dict(np.load({str(tmp_path / 'feed.npz')!r}));"
            f"s = ort.InferenceSession({str(tmp_path / 'g.onnx')!r}, providers=['CPUExecutionProvider']);"
            "c, qc, qc7 = s.run(None, f); np.savez(__import__('sys').argv[1], c=c, qc=qc, qc7=qc7)")
    outs = {}
    for label, env in (("native", unheld_env), ("held", held_env)):
        path = tmp_path / f"{label}.npz"
        r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        outs[label] = np.load(path)
    assert np.abs(outs["native"]["c"] - outs["held"]["c"]).max() <= 1e-4
    assert np.array_equal(outs["native"]["qc7"], outs["held"]["qc7"])
    if "avx512_vnni" in cpu_kernel_flags():
        assert not np.array_equal(outs["native"]["qc"], outs["held"]["qc"])


def test_other_segfaults_still_kill_and_reach_faulthandler(held_env) -> None:
    out = _py("import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)", held_env)
    assert out.returncode == -11
    assert "Segmentation fault" in out.stderr and "string_at" in out.stderr


def test_refuses_to_run_unheld() -> None:
    env = {**cpuid_mask.environment(), "CPUID_MASK": "avx512"}
    out = _py("print('ran')", env)
    assert out.returncode == 70 and "ran" not in out.stdout
    assert "the one level known is avx2" in out.stderr


def test_cli_runs_a_command_held() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.cpuid_mask", "--", sys.executable, "-c", cpuid_mask._SEEN],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["torch"] == "AVX2"


def test_cli_says_what_is_wrong() -> None:
    none = subprocess.run([sys.executable, "-m", "bench.cpuid_mask"], capture_output=True, text=True, timeout=60)
    assert none.returncode == 2 and "give a command to run held" in none.stderr
    missing = subprocess.run([sys.executable, "-m", "bench.cpuid_mask", "--", "no-such-command-here"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 127 and "cannot run 'no-such-command-here'" in missing.stderr
