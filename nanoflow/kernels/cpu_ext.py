"""Builds the C++ CPU kernels once (torch.utils.cpp_extension, cached on disk) and exposes them.

Falls back to the plain-torch path when no compiler is available, so nothing depends on it for correctness.
"""
from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)
_SRC = os.path.join(os.path.dirname(__file__), "csrc", "paged_decode.cpp")


@functools.lru_cache(maxsize=1)
def load():
    """The compiled module, or None if it cannot be built here."""
    if os.environ.get("NANOFLOW_NO_CPP") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load as load_ext
        return load_ext(name="nanoflow_cpu_kernels", sources=[_SRC], verbose=False,
                        extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                        extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler / ninja: keep working on the torch path
        log.warning("C++ CPU kernels unavailable (%s); using the torch fallback", e)
        return None
