"""The cross-request prefix cache: a radix tree over token ids (no torch needed)."""

from radixserve.radix_tree.node import TreeNode
from radixserve.radix_tree.policies import POLICIES, EvictionPolicy
from radixserve.radix_tree.results import EvictResult, MatchResult
from radixserve.radix_tree.tree import RadixTree

__all__ = ["RadixTree", "TreeNode", "MatchResult", "EvictResult", "EvictionPolicy", "POLICIES"]
