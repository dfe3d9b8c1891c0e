"""``python -m bench.cpuid_mask [--check] [-- command ...]``: run a command as on an AVX2-only host.

onnxruntime's MLAS, OpenVINO's kernels and glibc pick their instruction set from CPUID, so the environment
variables that hold torch and oneDNN to AVX2 (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``) leave them on
AVX-512. ``bench/cpuid_mask.c``, preloaded into every process of the command's tree, turns on Linux's CPUID
faulting and answers each CPUID with the AVX-512, AMX, AVX-VNNI, AVX10 and GFNI bits cleared (what an AMD Zen 3
host reports); glibc, which reads CPUID before any preload runs, is held by ``GLIBC_TUNABLES``. Every engine then
runs the code an AVX2 host runs, on this host's cores, caches and clock: it shows which engine and precision win
with AVX2 kernels, not the AVX2 host's absolute speed.

``CPUID_MASK=avx2`` is in the environment of every held process, so ``training.fingerprint`` records it as an ISA
limit and the host choice keys its cache apart. The library refuses to start a process it cannot hold.

``--check`` prints what torch, onnxruntime and OpenVINO see, held and not, and exits 1 unless the held run sees
AVX2 everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from training import paths
from training.fingerprint import cpu_flags

SOURCE = Path(__file__).with_name("cpuid_mask.c")
LEVEL = "avx2"
# glibc reads CPUID in the dynamic loader, before a preloaded library's constructor: its string functions are
# held by its own tunable instead.
GLIBC_HWCAPS = "glibc.cpu.hwcaps=-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL,-AVX512_VBMI,-AVX512_VNNI"


def unavailable() -> str | None:
    """Why this host cannot run held by the mask, or None when it can."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"CPUID faulting is a Linux x86_64 feature; this is {platform.system()} {platform.machine()}"
    if "cpuid_fault" not in cpu_flags():
        return "this CPU or hypervisor does not offer CPUID faulting (no cpuid_fault flag in /proc/cpuinfo)"
    if shutil.which("gcc") is None:
        return "gcc is needed to build bench/cpuid_mask.c and is not on PATH"
    return None


def library() -> Path:
    """The preload library, built from ``SOURCE`` on first use (one file per source digest)."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"cannot hold this host to AVX2 by CPUID: {reason}")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = paths.ARTIFACTS_DIR / "cpuid_mask" / f"libcpuid_mask-{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp), "-ldl"], check=True)
        tmp.replace(out)
    return out


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (the current environment by default) with the mask preloaded for every process started with it."""
    env = dict(os.environ if base is None else base)
    lib = str(library())
    preload = [lib, *[p for p in env.get("LD_PRELOAD", "").split(":") if p and p != lib]]
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.cpu.hwcaps=")]
    return env | {"LD_PRELOAD": ":".join(preload), "CPUID_MASK": LEVEL,
                  "GLIBC_TUNABLES": ":".join([*tunables, GLIBC_HWCAPS])}


def unheld_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` without the mask: what a process started from a held one needs to see the CPU as it is."""
    env = dict(os.environ if base is None else base)
    preload = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and not Path(p).name.startswith("libcpuid_mask")]
    tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and t != GLIBC_HWCAPS]
    env.pop("CPUID_MASK", None)
    return env | ({"LD_PRELOAD": ":".join(preload)} if preload else {}) | (
        {"GLIBC_TUNABLES": ":".join(tunables)} if tunables else {})


_SEEN = """
import json, openvino, torch
print(json.dumps({"torch": torch.backends.cpu.get_cpu_capability(),
                  "openvino": openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}))
"""


def seen(env: dict[str, str] | None = None) -> dict[str, object]:
    """What torch and OpenVINO report of the CPU in a fresh interpreter run with ``env``."""
    import json

    out = subprocess.run([sys.executable, "-c", _SEEN], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"a {'held ' if env and env.get('CPUID_MASK') else ''}interpreter failed "
                           f"(exit {out.returncode}): {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpuid_mask", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="print what torch and OpenVINO see, held and not")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run held to AVX2 (after --)")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not (a.check or command):
        p.error("give a command to run held (after --), or --check")
    try:
        env = environment()
        if a.check:
            here, held = seen(unheld_environment()), seen(env)
            print(f"not held: {here}\nheld:     {held}")
            if held["torch"] != "AVX2" or "BF16" in held["openvino"]:
                return 1
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if command:
        try:
            os.execvpe(command[0], command, env)
        except OSError as e:
            print(f"error: cannot run {command[0]!r}: {e.strerror}", file=sys.stderr)
            return 127
    return 0


if __name__ == "__main__":
    sys.exit(main())
