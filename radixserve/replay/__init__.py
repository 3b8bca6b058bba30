"""Trace replay: prefix-cache hit analysis on request traces, simulated or live.

The simulation runs each request through the engine's own RadixTree (no model,
no GPU); see docs/replay.md for the formats, the report and the guarantees.
"""

from radixserve.replay.formats import FORMATS, TraceFormatError, TraceReader, TraceRequest
from radixserve.replay.simulate import POLICIES, RunSpec, SimOptions, SimResult, simulate

__all__ = [
    "FORMATS", "POLICIES", "RunSpec", "SimOptions", "SimResult", "TraceFormatError", "TraceReader",
    "TraceRequest", "simulate",
]
