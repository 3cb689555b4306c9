"""CPU tensors on transparent huge pages (kernels/host_memory.py)."""
import pytest
import torch

from nanoflow.kernels import host_memory


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(f.read().split("AnonHugePages:")[1].split()[0])


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def test_zeros_is_an_ordinary_tensor():
    t = host_memory.zeros((3, 5), torch.bfloat16)  # smaller than a huge page: nothing to advise
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and not t.any()
    big = host_memory.zeros((1 << 22,), torch.float32)
    assert not big.any()


def test_large_tensors_get_huge_pages(monkeypatch):
    if _thp_mode() == "never":
        pytest.skip("transparent huge pages are off on this machine")
    before = _anon_huge_kb()
    t = host_memory.zeros((64 << 20,), torch.uint8)  # 64 MB
    assert _anon_huge_kb() - before >= 16 << 10, "at most a few of its 32 huge pages may be missing"
    del t
    if _thp_mode() == "madvise":  # (under "always" every large range gets huge pages anyway)
        monkeypatch.setenv("NANOFLOW_HUGE_PAGES", "0")
        before = _anon_huge_kb()
        t = host_memory.zeros((64 << 20,), torch.uint8)
        assert _anon_huge_kb() - before < 16 << 10
