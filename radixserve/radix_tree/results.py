"""What match_prefix and evict hand back to the caller."""

from __future__ import annotations

from typing import Any, NamedTuple

from radixserve.radix_tree.node import TreeNode


class MatchResult(NamedTuple):
    length: int  # matched tokens (whole pages only)
    values: list[Any]  # value pieces in order; their lengths sum to ``length``
    node: TreeNode  # deepest matched node, ending exactly at ``length``


class EvictResult(NamedTuple):
    """Also what ``reset`` returns: the tokens and value pieces dropped."""

    num_tokens: int  # tokens freed
    values: list[Any]  # value pieces the caller must free
