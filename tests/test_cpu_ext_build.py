"""The C++ kernel build never hangs a process: a build killed mid-way leaves no lock that blocks the next
process, and a build held by a live process is waited for only up to a timeout, then the torch path runs.
The "builder" is simulated by a process that holds the build lock (and torch's own lock file, as a build
does) and is then killed; each test uses its own cache dir (NANOFLOW_CACHE_DIR) so the real one is untouched."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from nanoflow.kernels import cpu_ext

pytestmark = pytest.mark.slow  # compiles the C++ kernels in subprocesses

HANG_GUARD_S = 300  # only against a hang: a healthy run takes seconds

HOLDER = """
import os, sys, fcntl, time
from nanoflow.kernels import cpu_ext
d = cpu_ext.build_dir()
os.makedirs(d, exist_ok=True)
fd = os.open(d + ".lock", os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
open(os.path.join(d, "lock"), "w").close()  # torch's baton, as a build in progress has it
print("held", flush=True)
time.sleep(3600)
"""
LOADER = "from nanoflow.kernels import cpu_ext; m = cpu_ext.load(); print('loaded' if m is not None else 'fallback')"


def env_for(cache: str, timeout_s: float) -> dict:
    return {**os.environ, "NANOFLOW_CACHE_DIR": cache, "NANOFLOW_CPP_BUILD_TIMEOUT": str(timeout_s)}


def start_holder(env: dict) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"  # blocks until the lock is taken, no sleeps
    return p


def run_loader(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOADER], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def test_build_dir_keyed_by_environment_torch_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    d = cpu_ext.build_dir()
    assert d.startswith(str(tmp_path / "cpp")) and f"py{sys.version_info[0]}{sys.version_info[1]}" in d
    import torch
    assert torch.__version__.replace("+", "_") in d
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-another-venv")
    assert cpu_ext.build_dir() != d  # another environment builds its own


def test_live_holder_times_out_to_torch_path(tmp_path):
    env = env_for(str(tmp_path), 1.0)
    holder = start_holder(env)
    try:
        r = run_loader(env)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fallback" and "build lock" in r.stderr


@pytest.fixture(scope="module")
def prebuilt() -> str:
    """The real build of this environment (built once if missing; other test files build it anyway)."""
    if cpu_ext.load() is None:
        pytest.skip("no C++ toolchain here")
    return cpu_ext.build_dir()


def test_killed_builder_leaves_no_hang(tmp_path, prebuilt):
    """A builder killed with SIGKILL: the next process gets the lock at once, drops torch's stale lock file
    (torch alone would wait on it forever) and loads the (here already compiled) kernels."""
    env = env_for(str(tmp_path), 120.0)
    d = subprocess.run([sys.executable, "-c", "from nanoflow.kernels import cpu_ext; print(cpu_ext.build_dir())"],
                       env=env, capture_output=True, text=True, check=True).stdout.strip()
    shutil.copytree(prebuilt, d)  # the objects are up to date: no compile, only the lock logic runs
    holder = start_holder(env)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(os.path.join(d, "lock"))  # what a killed build leaves behind
    r = run_loader(env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "loaded", r.stderr
    assert not os.path.exists(os.path.join(d, "lock"))
