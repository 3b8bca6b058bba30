"""Torch's intra-op threads for an engine on the CPU.

The engine's own host work (scheduling, batch building, sampling bookkeeping,
detokenizing) is Python on one thread beside the tensor work. With an OpenMP
thread on every CPU, that Python thread, or any other process, takes a core
from the team, and each of a step's hundreds of parallel operations then waits
at its barrier for the descheduled thread. Measured on a 2-core VM shared with
other jobs, a decode step of 32 sequences of the built-in model took 0.14 s to
1.8 s from run to run with two threads, 0.26 to 0.37 s with one. So steps of few
rows (decodes) leave one CPU to the host, as vLLM's CPU backend does: every CPU
this process may run on, less one, at least one.

Steps of many rows (prefill chunks) compute on every usable CPU (`StepThreads`).
Their host work is nothing beside their compute, and each of their operations
runs for milliseconds, so a thread of the team that another job delays holds
the barrier for a small part of the operation: at worst the step takes a little
longer than on one thread. Measured on the same VM (32 prompts of 320 tokens, each
prefill step 2,048 tokens, the model's threads set in the engine's own thread):
a prefill step 2.3-2.5 s on two threads against 3.9-4.3 s on one with the other
CPU free; against a busy loop on the other CPU, 4.3-5.2 s against 4.0-4.4 s.

torch's thread count is kept per thread (OpenMP's): `torch.set_num_threads` in one
thread leaves another that has already computed at the count it had, so the runner
sets it in the thread that runs the forward. OMP_NUM_THREADS, when set, wins: every
step then runs on that many threads.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

# A forward of at least this many rows (a prefill chunk; a decode step of this many
# sequences) runs on every usable CPU; smaller ones on default_cpu_threads().
WIDE_STEP_ROWS = 256


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


class StepThreads:
    """Torch's intra-op threads for each forward on the CPU, by its rows: every usable CPU
    for WIDE_STEP_ROWS rows or more, `default_cpu_threads()` below. Off (every step keeps
    the count in force) where OMP_NUM_THREADS is set. `apply` must run in the thread that
    runs the forward (the count is per thread)."""

    def __init__(self) -> None:
        self.enabled = not os.environ.get("OMP_NUM_THREADS")
        self.narrow = default_cpu_threads()
        self.wide = usable_cpus()

    def threads_for(self, rows: int) -> int:
        return self.wide if rows >= WIDE_STEP_ROWS else self.narrow

    def apply(self, rows: int) -> int:
        """Set the calling thread's count for a forward of `rows` rows; returns the count in force."""
        if not self.enabled:
            return torch.get_num_threads()
        threads = self.threads_for(rows)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads
