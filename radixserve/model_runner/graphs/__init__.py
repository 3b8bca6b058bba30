"""CUDA graphs: whole decode steps (decode.py), and prefill and mixed steps as captured pieces
between eager attention calls (piecewise.py). Both take the runner's parts (parts.py)."""

from radixserve.model_runner.graphs.decode import DecodeGraphRunner
from radixserve.model_runner.graphs.parts import GraphParts, unsupported_reason
from radixserve.model_runner.graphs.piecewise import MAX_ROWS, PiecewiseGraphRunner

__all__ = ["MAX_ROWS", "DecodeGraphRunner", "GraphParts", "PiecewiseGraphRunner", "unsupported_reason"]
