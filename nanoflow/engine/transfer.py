"""Host -> device copies of small host-built tensors on the step path."""
from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. To a GPU through pinned memory without blocking: a copy from pageable memory waits for
    the device's streams to drain (a sync per call), a pinned one is ordered on the current stream instead."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)
