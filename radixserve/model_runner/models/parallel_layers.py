"""The layers that tensor parallelism changes: a row-parallel linear (its output summed over the
ranks) and a vocabulary-parallel embedding. Built only when the model has more than one rank;
a one-rank model keeps nn.Linear and nn.Embedding (no collective, no extra copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.model_runner.parallel import TPComm


class RowParallelLinear(nn.Linear):
    """`x [T, in/n] @ W_r^T`, summed over the ranks (one all-reduce), then the bias once.

    Its input is a column-parallel layer's output (this rank's heads or intermediate
    columns), so its weight holds the matching input columns; the bias is whole on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, comm: TPComm) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows [start, start + rows) of the embedding matrix; an id outside them
    contributes zeros, so the all-reduce leaves every token its one row."""

    def __init__(self, start: int, rows: int, dim: int, dtype: torch.dtype, comm: TPComm) -> None:
        super().__init__(rows, dim, dtype=dtype)
        self.start = start
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.comm.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


def row_linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype, comm: TPComm | None) -> nn.Linear:
    """nn.Linear with one rank, else this rank's RowParallelLinear (`in_features` is its share)."""
    if comm is None:
        return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return RowParallelLinear(in_features, out_features, bias, dtype, comm)
