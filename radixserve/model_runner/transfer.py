"""Host -> device copies that never make the host wait for the GPU.

A copy from pageable host memory (`tensor.to("cuda")`, even with
`non_blocking=True`) is staged by the driver, which first waits for every
kernel already queued on the stream (CUDA's API synchronization behavior:
"for transfers from pageable host memory to device memory, a stream sync is
performed before the copy is initiated"). With overlapped scheduling the
previous step is still running when the next one is launched, so each such
copy would hold the host until the GPU drains, and the GPU would then idle
while the host launches. From pinned memory the copy is queued and the host
goes on; the caching host allocator keeps the pinned block until the copy is done.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from the CPU to CUDA through pinned memory, without a host wait."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
