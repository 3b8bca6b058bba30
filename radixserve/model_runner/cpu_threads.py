"""Torch's intra-op threads for an engine on the CPU.

The engine's own host work (scheduling, batch building, sampling bookkeeping,
detokenizing) is Python on one thread beside the tensor work. With an OpenMP
thread on every CPU, that Python thread, or any other process, takes a core
from the team, and each of a step's hundreds of parallel operations then waits
at its barrier for the descheduled thread. Measured on a 2-core VM shared with
other jobs, a decode step of 32 sequences of the built-in model took 0.14 s to
1.8 s from run to run with two threads, 0.26 to 0.37 s with one; a prefill of
12 prompts of 320 tokens ran at 533-597 tokens/s with one thread and 175-197
with two (alternating in one process); end to end (benchmarks/cpu_e2e.py) one
thread did as well or better. With the packed linears and kept K/V copies,
prefill of 12 prompts of 320 tokens alternating one and two threads took 13.4 and
15.0 s with one, 14.5 and 14.9 s with two (decode steps 227-256 ms against
237-260): a second thread buys nothing while anything else runs. So the default leaves
one CPU to the host, as vLLM's CPU backend does: every CPU this process may run
on, less one, at least one. OMP_NUM_THREADS, when set, wins.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_cpu_threads() -> int:
    return max(1, usable_cpus() - 1)


def configure_cpu_threads() -> int:
    """Set torch's intra-op threads to `default_cpu_threads()` unless OMP_NUM_THREADS chose
    them; returns the number in force. Process-wide (torch has one pool per process)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = default_cpu_threads()
    if torch.get_num_threads() != threads:
        logger.info("torch CPU threads: %d of %d CPUs (one left to the engine's host work; "
                    "OMP_NUM_THREADS overrides)", threads, usable_cpus())
        torch.set_num_threads(threads)
    return threads
