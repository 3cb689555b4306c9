"""Builds the C++ CPU kernels once per environment (torch.utils.cpp_extension, into the nanoflow cache dir,
under a lock that dies with its holder) and exposes them.

Falls back to the plain-torch path when no compiler is available, so nothing depends on it for
correctness. Each engine says whether it wants them (`EngineConfig.cpp_kernels`, `--no-cpp-kernels`): its runner
runs every step inside `switched(flag)`, so engines with different settings coexist in one process.
NANOFLOW_NO_CPP=1 switches every C++ kernel off whatever an engine asks, for ablations and tests.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os

from nanoflow import env, profiling

log = logging.getLogger(__name__)
_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = [os.path.join(_CSRC, f) for f in ("bindings.cpp", "paged_decode.cpp", "fused_ops.cpp", "gemm_bf16.cpp",
                                                   "gemm_f32.cpp", "layer_stack.cpp")]
# (in the build key: a header change is a new build)
_HEADERS = [os.path.join(_CSRC, f) for f in ("vec.h", "claimed_runs.h", "gemm_tiles.h", "gemm_f32_avx512.h",
                                                   "decode_common.h", "decode_bf16.h", "decode_f32.h")]
_env_off = env.no_cpp()
# Outside a step: on unless NANOFLOW_NO_CPP; inside one: that engine's choice (switched). A context variable,
# so engines stepping at the same time on different threads each see their own.
_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("nanoflow_cpp_kernels", default=not _env_off)


@contextlib.contextmanager
def switched(flag: bool):
    """C++ kernels on (`flag`) or off for the code inside: a runner's step, with its engine's setting. The
    kernels are module-level functions picked deep in the model (get/enabled), so the step scopes the choice
    rather than every call site carrying it; the environment switch always wins."""
    token = _enabled.set(flag and not _env_off)
    try:
        yield
    finally:
        _enabled.reset(token)


def enabled() -> bool:
    return _enabled.get()


def get():
    """The compiled module when C++ kernels are on and buildable, else None (use the torch path).
    While profiling, each kernel call is a labelled range (pybind calls are invisible to the profiler)."""
    ext = load() if _enabled.get() else None
    return _Labelled(ext) if ext is not None and profiling._active else ext


class _Labelled:
    def __init__(self, ext) -> None:
        self._ext = ext

    def __getattr__(self, name: str):
        fn = getattr(self._ext, name)

        def call(*args):
            with profiling.region(f"nanoflow::{name} (C++)"):
                return fn(*args)
        return call


_NAME = "nanoflow_cpu_kernels"
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
BUILD_TIMEOUT_S = 600.0  # a build takes ~1 min (several on a loaded machine); NANOFLOW_CPP_BUILD_TIMEOUT overrides


@functools.lru_cache(maxsize=1)
def load():
    """The compiled module, or None if it cannot be built here (or another process held the build longer
    than the timeout: then this process runs the torch path, with a warning, rather than wait)."""
    try:
        from torch.utils.cpp_extension import load as load_ext
        path = build_dir()
        os.makedirs(path, exist_ok=True)
        timeout = env.cpp_build_timeout_s(BUILD_TIMEOUT_S)
        with build_lock(path + ".lock", timeout) as held:
            if not held:
                log.warning("C++ CPU kernels: another process has held the build lock %s.lock for over %.0f s; "
                            "using the torch fallback", path, timeout)
                return None
            _remove_torch_baton(path)
            return load_ext(name=_NAME, sources=_SOURCES, build_directory=path, verbose=False,
                            extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS))  # (torch appends to them)
    except Exception as e:  # no compiler / ninja: keep working on the torch path
        log.warning("C++ CPU kernels unavailable (%s); using the torch fallback", e)
        return None


def build_dir() -> str:
    """<nanoflow cache>/cpp/<key>: one build per interpreter (environment), torch version, CPU (-march=native)
    and source/flag hash. Not torch's shared ~/.cache/torch_extensions, where virtualenvs of the same Python
    overwrite each other's build and a killed build's lock blocks everyone."""
    import hashlib
    import platform
    import sys

    import torch

    h = hashlib.sha256()
    for f in _SOURCES + _HEADERS:
        with open(f, "rb") as fh:
            h.update(fh.read())
    # The sources' directory too: ninja rebuilds when a source path changes, so two checkouts sharing one
    # environment (a copy of the tree running benchmarks) would otherwise rebuild each other's kernels in turn.
    h.update(" ".join(_CFLAGS + _LDFLAGS + [sys.prefix, sys.version, platform.machine(), _cpu_flags(),
                                            os.path.dirname(os.path.abspath(_SOURCES[0]))]).encode())
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{h.hexdigest()[:16]}"
    return os.path.join(env.cache_dir("cpp"), tag.replace("+", "_"))


@functools.lru_cache(maxsize=None)
def cpu_has(flag: str) -> bool:
    """Whether this CPU has instruction-set `flag` (as /proc/cpuinfo spells it, e.g. "avx512f")."""
    return flag in _cpu_flags().split()


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): where bf16 is the fast dtype, and where
    oneDNN's bf16 is not an emulation (it is on AVX-512 without BF16, e.g. Ice Lake)."""
    return cpu_has("avx512_bf16") or cpu_has("amx_bf16")


def _cpu_flags() -> str:
    """The instruction-set flags that -march=native depends on (not all of /proc/cpuinfo's: some of those
    change at run time, and each change would cost a rebuild)."""
    import re
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""
    isa = re.compile(r"(avx|sse|ssse|fma|amx|bmi|f16c|vnni|vpclmul|vaes|gfni|adx|popcnt|movbe|abm|sha|aes|pclmul)")
    return " ".join(sorted(w for w in line.split()[2:] if isa.match(w)))


@contextlib.contextmanager
def build_lock(path: str, timeout_s: float):
    """An exclusive flock on `path`, polled until `timeout_s`; yields whether it is held. The kernel releases
    a flock when its holder dies, so a killed build never leaves a lock behind."""
    import fcntl
    import time
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, held = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
        yield held
    finally:
        os.close(fd)  # (releases the flock)


def _remove_torch_baton(path: str) -> None:
    """torch's own build lock (a plain file) inside the build directory: under our flock nobody else builds
    there, so one left by a killed build is stale and would make torch wait forever."""
    try:
        os.remove(os.path.join(path, "lock"))
        log.warning("removed a stale C++ build lock in %s (a build was killed)", path)
    except FileNotFoundError:
        pass
