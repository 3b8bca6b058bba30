"""Tensor parallelism, rank 0's side: start the other ranks, send each step, watch them.

One process per rank. On one host the engine spawns ranks 1..N-1 itself (the `spawn`
start method: CUDA cannot be forked) and rank 0 lives in the engine's process; across
hosts (`nnodes`) every other host runs `run_node`, which spawns its own ranks, and all of
them meet at `dist_init_addr` (torch.distributed's TCP rendezvous). What the ranks say to
each other each step is in tp_worker.py.

Failure is loud and bounded: a rank that exits is seen before the next step is sent (or
while the engine idles), and a collective that a dead or hung rank never joins fails
within `dist_timeout`; either raises EngineFatalError. Shutting down sends every rank
`stop`, then kills any that has not exited within the timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radixserve.engine.config import EngineConfig
from radixserve.engine.tp_worker import StepMessage, exchange, resolve_device, run_rank, share_tokens
from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.kv_pool import ReqToTokenPool
from radixserve.model_runner.model_config import ModelConfig
from radixserve.model_runner.parallel import Rendezvous, TPComm, TPShard, leave

logger = logging.getLogger(__name__)

_STOP_WAIT_S = 30.0  # the most a clean shutdown waits for a rank to exit before killing it


class RankFailure(RuntimeError):
    """A tensor-parallel rank exited, or a collective with the other ranks failed."""


def free_local_addr() -> str:
    """127.0.0.1 and a port free now (the rendezvous of a one-host engine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _spawn(config: EngineConfig, model_path: Path, addr: str, ranks: list[tuple[int, int]]) -> list[BaseProcess]:
    """One process per (global rank, local rank)."""
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = []
    for rank, local_rank in ranks:
        rendezvous = Rendezvous(addr, config.tensor_parallel_size, rank, config.dist_timeout)
        proc = ctx.Process(target=run_rank, args=(config, model_path, rendezvous, local_rank),
                           name=f"radixserve-tp-rank{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def _stop(procs: list[BaseProcess], wait_s: float) -> None:
    """Wait up to `wait_s` for the processes to exit, then kill those left."""
    deadline = time.monotonic() + wait_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            logger.warning("tensor-parallel rank process %s (pid %s) did not stop; killing it", proc.name, proc.pid)
            proc.kill()
            proc.join(timeout=10)


class TPDriver:
    """Rank 0 of a tensor-parallel engine (EngineCore holds one when tensor_parallel_size > 1)."""

    def __init__(self, config: EngineConfig, model_path: Path) -> None:
        if config.node_rank != 0:
            raise ValueError("node_rank > 0 runs tensor-parallel ranks only (run_node), not an engine")
        # A model that the ranks cannot share fails here, before any process starts.
        TPShard(0, config.tensor_parallel_size).check(ModelConfig.from_pretrained(model_path))
        if dist.is_initialized():
            raise RuntimeError(
                "this process already holds a torch.distributed process group: one tensor-parallel engine "
                "per process (shut the other down first)"
            )
        self.timeout = float(config.dist_timeout)
        local = config.tensor_parallel_size // config.nnodes
        addr = config.dist_init_addr or free_local_addr()
        self.device = resolve_device(config.device, 0)
        self.procs = _spawn(config, model_path, addr, [(r, r) for r in range(1, local)])
        self.failed: str | None = None  # why the group is unusable (then nothing more is sent)
        try:
            self.comm: TPComm = Rendezvous(addr, config.tensor_parallel_size, 0, self.timeout).join(self.device)
        except BaseException:
            _stop(self.procs, 0.0)
            raise
        self.table: ReqToTokenPool | None = None
        self._last_send = time.monotonic()

    @property
    def size(self) -> int:
        return self.comm.size

    def attach(self, table: ReqToTokenPool) -> None:
        """Record `table`'s writes from now on: each step carries them to the other ranks."""
        table.log = []
        self.table = table

    def check(self) -> None:
        """RankFailure if a rank of this host has exited, or the group failed earlier."""
        if self.failed is None:
            for proc in self.procs:
                if proc.exitcode is not None:
                    self.failed = f"tensor-parallel rank process {proc.name} (pid {proc.pid}) exited " \
                                  f"with code {proc.exitcode}"
                    break
        if self.failed is not None:
            raise RankFailure(self.failed)

    def _send(self, message: StepMessage) -> None:
        self.check()
        try:
            exchange(self.comm, message)
        except Exception as exc:
            self.failed = f"sending a step to the tensor-parallel ranks failed: {exc}"
            raise RankFailure(self.failed) from exc
        self._last_send = time.monotonic()

    def _writes(self) -> list[torch.Tensor]:
        if self.table is None or not self.table.log:
            return []
        writes, self.table.log = self.table.log, []
        return writes

    def send_step(self, batch: ForwardBatch, sampled: int) -> None:
        """Before rank 0's forward: every other rank runs `batch` too (and takes `sampled` tokens)."""
        # input_source is rank 0's device tensor: the others hold their own copy of the tokens.
        self._send(StepMessage(dataclasses.replace(batch, input_source=None), self._writes(), sampled))

    def share_tokens(self, tokens: torch.Tensor) -> None:
        """After rank 0's sampling: its tokens to every rank (the next step's sourced ids)."""
        share_tokens(self.comm, tokens)

    def mark_failed(self, exc: BaseException) -> None:
        """A step raised on rank 0 after it was sent: the ranks no longer run the same steps."""
        if self.failed is None:
            self.failed = f"a tensor-parallel step failed on rank 0: {exc!r}"

    def heartbeat(self) -> None:
        """While idle: check the ranks; every timeout / 4 tell them rank 0 is still here."""
        self.check()
        if time.monotonic() - self._last_send >= self.timeout / 4:
            self._send(StepMessage(None, self._writes(), 0))

    @property
    def heartbeat_interval(self) -> float:
        return self.timeout / 8

    def close(self) -> None:
        """Stop every rank (a clean stop where the group still works, else kill) and leave the group."""
        clean = False
        if self.failed is None:
            try:
                self._send(StepMessage(None, [], 0, stop=True))
                clean = True
            except RankFailure:
                logger.warning("tensor-parallel ranks could not be told to stop: %s", self.failed)
        _stop(self.procs, min(self.timeout, _STOP_WAIT_S) if clean else 0.0)
        leave(min(self.timeout, _STOP_WAIT_S))


def run_node(config: EngineConfig, model_path: Path) -> int:
    """A host other than rank 0's (node_rank > 0): run its tensor-parallel ranks until they exit
    (rank 0's engine shuts down, or fails). Returns the number of ranks that failed."""
    if config.node_rank == 0:
        raise ValueError("node_rank 0 serves: start the engine there, not run_node")
    local = config.tensor_parallel_size // config.nnodes
    addr = config.dist_init_addr
    if addr is None:
        raise ValueError("dist_init_addr (rank 0's host:port) is needed when nnodes > 1")
    first = config.node_rank * local
    procs = _spawn(config, model_path, addr, [(first + i, i) for i in range(local)])
    try:
        for proc in procs:
            proc.join()
    finally:
        _stop(procs, 0.0)
    return sum(1 for p in procs if p.exitcode != 0)
