"""CPU tensors on transparent huge pages (kernels/host_memory.py)."""
import pytest
import torch

from nanoflow.kernels import host_memory


def _vm_flags(t: torch.Tensor) -> list[str]:
    """The VmFlags of the mapping holding t's first byte (/proc/self/smaps)."""
    addr, region = t.data_ptr(), None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                region = lo <= addr < hi
            elif head == "VmFlags:" and region:
                return line.split()[1:]
    raise AssertionError("no mapping holds the tensor")


def test_zeros_is_an_ordinary_tensor():
    small = host_memory.zeros((3, 5), torch.bfloat16)  # under 4 MB: a plain tensor
    assert small.shape == (3, 5) and small.dtype == torch.bfloat16 and not small.any()
    big = host_memory.zeros((2, 1 << 21), torch.float32)
    assert big.shape == (2, 1 << 21) and not big.any() and big.is_contiguous()
    big[1, -1] = 3.0
    assert big.sum() == 3.0


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise is Linux's")
def test_large_tensors_are_advised_huge_pages_and_the_switch_turns_it_off(monkeypatch):
    t = host_memory.zeros((64 << 20,), torch.uint8)
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0
    assert "hg" in _vm_flags(t)  # MADV_HUGEPAGE took: the kernel backs it with 2 MB pages where it has them
    # Off: a plain torch tensor, no mapping of its own (what malloc's memory sits next to is not ours to check:
    # in the full suite a malloc'd block once landed in a range already flagged hg)
    monkeypatch.setenv("NANOFLOW_HUGE_PAGES", "0")

    def no_mapping(*args, **kwargs):
        raise AssertionError("NANOFLOW_HUGE_PAGES=0 must not map memory of its own")
    monkeypatch.setattr(host_memory.mmap, "mmap", no_mapping)
    off = host_memory.zeros((64 << 20,), torch.uint8)
    assert off.shape == (64 << 20,) and not off.any()
