"""A prefill batch's fold plan: which uncached tokens are computed once.

Each sequence hangs under the radix node its prompt matched (its *root*).
Two sequences fold only if their roots are the same node and their uncached
(token, position) paths agree from that node on; the plan is the RadixMLP
fold of `folding.py` with one trie namespace per root.

    seq 0  root A: [5 6 7]      rows 0 1 2
    seq 1  root A: [5 6 9]      rows 0 1 3      (5, 6 folded onto seq 0)
    seq 2  root B: [5 6]        rows 4 5        (other root: nothing folds)
    seq 3  root A: [5 6]        rows 0 1        (wholly inside seq 0: no rows
                                                  of its own; last row 1)
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from radixserve.scheduler.folding import (
    INT_DTYPES,
    as_int_array,
    check_pad_multiple_of,
    fold_rows,
    pad_rows,
)

FOLD_MODES = ("off", "mlp", "tree")  # what the batch builder does with a fold plan (batch_builder.py)

__all__ = ["FoldPlan", "build_fold_plan"]


@dataclass(frozen=True, eq=False)
class FoldPlan:
    """Compact rows of a batch plus the maps between them and the tokens.

    compact[j] = original[fold_gather[j]]; unfolded[i] = compact[scatter[i]].
    Rows past `num_rows` are padding (token 0, position 0, gather 0) and no
    token's scatter points at them. All arrays are int64.
    """

    compact_ids: np.ndarray  # [num_rows (+ padding)]
    compact_positions: np.ndarray  # [num_rows (+ padding)]
    scatter: np.ndarray  # [num_tokens] -> row
    fold_gather: np.ndarray  # [num_rows (+ padding)] -> first token of the row
    cu_seqlens: np.ndarray  # [num_seqs + 1] over the original tokens
    last_rows: np.ndarray  # [num_seqs] row of each sequence's last token; -1 if empty
    folded_tokens: np.ndarray  # [num_seqs] tokens served by rows an earlier sequence made
    num_rows: int  # live compact rows

    @property
    def num_tokens(self) -> int:
        return int(self.scatter.size)

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.size - 1)

    @property
    def fold_ratio(self) -> float:
        """Live compact rows / original tokens (1.0 for an empty batch)."""
        return self.num_rows / self.num_tokens if self.num_tokens else 1.0


def build_fold_plan(
    token_ids: Sequence[Any],
    positions: Sequence[Any],
    root_keys: Sequence[Hashable],
    pad_multiple_of: int | None = None,
) -> FoldPlan:
    """Plan the fold of a batch's uncached tokens.

    token_ids, positions: one 1-D int sequence (list or numpy array) per
    sequence, of equal lengths. root_keys: per sequence, an opaque hashable
    identity of the radix node it matched; only equal keys fold together.
    Raises ValueError naming the offending argument.
    """
    ids, lengths = _flatten(token_ids, "token_ids")
    pos, pos_lengths = _flatten(positions, "positions")
    if not np.array_equal(lengths, pos_lengths):
        raise ValueError("positions must have one entry per token of token_ids, sequence by sequence")
    groups = _root_groups(root_keys, lengths.size)
    multiple = check_pad_multiple_of(pad_multiple_of)

    cu = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    scatter, gather = (a.astype(np.int64) for a in fold_rows(ids, pos, cu, groups))

    last_rows = np.full(lengths.size, -1, dtype=np.int64)
    nonempty = lengths > 0
    last_rows[nonempty] = scatter[cu[1:][nonempty] - 1]
    # Rows a sequence creates are its first-occurrence tokens: the gathers
    # that fall inside its token range.
    own_rows = np.diff(np.searchsorted(gather, cu))
    return FoldPlan(
        compact_ids=pad_rows(ids[gather], multiple),
        compact_positions=pad_rows(pos[gather], multiple),
        scatter=scatter,
        fold_gather=pad_rows(gather, multiple),
        cu_seqlens=cu,
        last_rows=last_rows,
        folded_tokens=lengths - own_rows,
        num_rows=int(gather.size),
    )


def _flatten(seqs: Sequence[Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-sequence int sequences into one int64 array + lengths."""
    if not isinstance(seqs, (list, tuple)):
        raise ValueError(f"{name} must be a list of per-sequence int sequences, got {type(seqs).__name__}")
    if all(isinstance(s, np.ndarray) for s in seqs):
        for s in seqs:
            if s.ndim != 1 or s.dtype not in INT_DTYPES:
                raise ValueError(f"{name}: each array must be 1-D int32, int64 or uint32")
        lengths = np.fromiter((s.size for s in seqs), dtype=np.int64, count=len(seqs))
        flat = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, dtype=np.int64)
        return flat, lengths
    try:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    except TypeError:
        raise ValueError(f"{name} must hold one int sequence per sequence") from None
    flat, _ = as_int_array(list(itertools.chain.from_iterable(seqs)), name)
    return flat.astype(np.int64, copy=False), lengths


def _root_groups(root_keys: Sequence[Hashable], num_seqs: int) -> np.ndarray | None:
    """Dense group ids in first-seen order; None when every root is the same."""
    if not isinstance(root_keys, (list, tuple)) or len(root_keys) != num_seqs:
        raise ValueError(f"root_keys must be a list with one key per sequence ({num_seqs})")
    index: dict[Hashable, int] = {}
    try:
        groups = [index.setdefault(k, len(index)) for k in root_keys]
    except TypeError:
        raise ValueError("root_keys must be hashable") from None
    return None if len(index) <= 1 else np.asarray(groups, dtype=np.int64)
