"""Accelerator specs (the paper's Table 1) and the aggregate view the cost model needs.

All sizes are decimal (1 GB = 1e9 bytes), as in the paper; this is what makes Fig. 3 and
Table 2 come out to the paper's digits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Hardware:
    """One accelerator's datasheet numbers; `num_devices` of them form one instance."""

    name: str
    mem_size_gb: float  # MemSize per device
    mem_bw_gbs: float  # MemBW per device
    net_bw_gbs: float  # NetBW per device, as listed (both directions); 0 = no interconnect
    compute_gflops: float  # dense FP16/BF16 GEMM peak per device
    num_devices: int = 1

    # Aggregates over the instance (the paper's symbols are aggregate, docs/paper-notes.md).
    @property
    def total_mem_bytes(self) -> float:
        return self.mem_size_gb * 1e9 * self.num_devices

    @property
    def total_mem_bw(self) -> float:
        return self.mem_bw_gbs * 1e9 * self.num_devices

    @property
    def total_flops(self) -> float:
        return self.compute_gflops * 1e9 * self.num_devices

    @property
    def net_bw_oneway(self) -> float:
        """Per-device one-way bandwidth in B/s: Table 1 lists bidirectional NVLink, the paper's
        Table 2 and Fig. 2 divide by two (footnote of Table 2)."""
        return self.net_bw_gbs * 1e9 / 2

    def with_devices(self, n: int) -> "Hardware":
        if n < 1:
            raise ValueError(f"num_devices must be >= 1, got {n}")
        return replace(self, num_devices=n)


def _hw(name: str, mem: float, bw: float, net: float, tflops: float) -> Hardware:
    return Hardware(name, mem, bw, net, tflops * 1e3)


# Table 1 of the paper, verbatim (H200 is 96 GB there although the real part has 141 GB).
TABLE1: dict[str, Hardware] = {h.name: h for h in (
    _hw("V100", 16, 900, 300, 125),
    _hw("A100-40GB", 40, 1555, 600, 312),
    _hw("A100-80GB", 80, 2000, 600, 312),
    _hw("H100", 80, 3352, 900, 989),
    _hw("H200", 96, 4800, 900, 989),
    _hw("B100", 120, 8000, 1800, 1800),
    _hw("B200", 120, 8000, 1800, 2250),
    _hw("MI250", 128, 3352, 800, 362),
    _hw("MI300", 192, 5300, 1024, 1307),
    _hw("MI325X", 256, 6000, 1024, 1307),
    _hw("Gaudi2", 96, 2400, 600, 1000),
    _hw("Gaudi3", 128, 3700, 1200, 1800),
    _hw("Ada6000", 48, 960, 64, 182),
)}

# Extra spellings; the paper's testbed is the 80 GB A100, so a bare "A100" means that one.
_ALIASES = {"a100": "A100-80GB", "a10080": "A100-80GB", "a10040": "A100-40GB", "mi300x": "MI300",
            "ada6000pcie": "Ada6000", "rtx6000ada": "Ada6000"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_hardware(name: str, num_devices: int = 1) -> Hardware:
    """Case- and punctuation-insensitive lookup ("a100-80gb", "A100 80GB", "gaudi 2")."""
    k = _key(name)
    table = {_key(n): h for n, h in TABLE1.items()}
    hw = table.get(k) or (TABLE1.get(_ALIASES[k]) if k in _ALIASES else None)
    if hw is None:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(TABLE1)}")
    return hw.with_devices(num_devices)
