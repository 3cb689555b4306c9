"""Builds the C++ CPU kernels once (torch.utils.cpp_extension, cached on disk) and exposes them.

Falls back to the plain-torch path when no compiler is available, so nothing depends on it for
correctness. `set_enabled(False)` (or NANOFLOW_NO_CPP=1) switches every C++ kernel off, for ablations
and for tests that compare the two paths.
"""
from __future__ import annotations

import functools
import logging
import os

from nanoflow import profiling

log = logging.getLogger(__name__)
_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = [os.path.join(_CSRC, f) for f in ("bindings.cpp", "paged_decode.cpp", "fused_ops.cpp")]
_env_off = os.environ.get("NANOFLOW_NO_CPP") == "1"
_enabled = not _env_off


def set_enabled(flag: bool) -> None:
    """Process-wide (the kernels are module-level functions); the environment switch always wins."""
    global _enabled
    _enabled = flag and not _env_off


def enabled() -> bool:
    return _enabled


def get():
    """The compiled module when C++ kernels are on and buildable, else None (use the torch path).
    While profiling, each kernel call is a labelled range (pybind calls are invisible to the profiler)."""
    ext = load() if _enabled else None
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


@functools.lru_cache(maxsize=1)
def load():
    """The compiled module, or None if it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load as load_ext
        _remove_stale_build_lock("nanoflow_cpu_kernels")
        return load_ext(name="nanoflow_cpu_kernels", sources=_SOURCES, verbose=False,
                        extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                        extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler / ninja: keep working on the torch path
        log.warning("C++ CPU kernels unavailable (%s); using the torch fallback", e)
        return None


def _remove_stale_build_lock(name: str, max_age_s: float = 600.0) -> None:
    """torch's build lock outlives a build that was killed (OOM, Ctrl-C), and every later process then waits
    on it forever; a build takes ~1 minute, so a lock older than `max_age_s` is stale."""
    import time
    from torch.utils.cpp_extension import _get_build_directory
    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        if time.time() - os.path.getmtime(lock) > max_age_s:
            os.remove(lock)
            log.warning("removed a stale C++ build lock %s", lock)
    except OSError:
        pass
