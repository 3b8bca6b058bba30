"""Float32 linear layers on the CPU: oneDNN on a weight packed once, for decode-sized inputs.

torch's `F.linear` in float32 on the CPU is MKL's sgemm, which re-reads the weight
in its row-major layout on every call. A decode step is a few rows against every
weight of the model (540 MB for the built-in SmolLM2-135M), so its matmuls are
bound by how the weights stream from memory: oneDNN's inner product on a weight
reordered once into its blocked layout (`mkldnn._reorder_linear_weight`, what
Inductor's CPU weight prepacking uses) streams them faster. Measured on the
2-core VM of docs/benchmarks.md (one thread, other jobs running): 30 layers of
the built-in model at 32 rows, 164-167 ms against 197-206 with `F.linear`;
the tied 49,152-row output projection, 18 ms against 27-33. At 2,048 rows
(prefill chunks) MKL is ~10% faster, so inputs of more than `PACKED_MAX_ROWS`
rows keep `F.linear`. The packed copy doubles the weights' memory.

Each output row of the packed path is independent of how many rows share the
call (checked: bitwise), where MKL's gemv for one row differs from its gemm; both
paths agree to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Inputs of at most this many rows take the packed weight (at 512 rows it measured faster,
# at 2,048 slower than F.linear).
PACKED_MAX_ROWS = 512


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed inner product serves float32 on CPUs where torch has oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight `[out, in]` reordered for `packed_linear` (an opaque float32 buffer)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # 32: the rows it is tuned for


def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through `packed` (pack_weight of `weight`) for 2-D inputs of
    1 to PACKED_MAX_ROWS rows."""
    if packed is not None and x.dim() == 2 and 0 < x.shape[0] <= PACKED_MAX_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class PackedLinear(nn.Linear):
    """nn.Linear holding its weight packed as well (the same Parameters, so the same names)."""

    packed: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.packed = pack_weight(linear.weight)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.packed, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Swap every plain nn.Linear of `model` (not subclasses such as the row-parallel one,
    whose forward adds a collective) for a PackedLinear; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear.from_linear(child))
                swapped += 1
    return swapped
