"""Tensor parallelism: what every rank runs, and what the ranks other than 0 do.

One scheduler, on rank 0. Each step rank 0 broadcasts a `StepMessage` over the control
group (gloo, host objects): the step's `ForwardBatch` and the request-table writes made
since the last one (the other ranks keep a copy of the table; the scheduler writes only
rank 0's). Every rank then runs the same forward; the collectives inside the model
(parallel.py) pair the ranks up. Rank 0 samples from the whole logits (all-gathered)
and broadcasts the sampled tokens on the device group, so that an overlapped next step's
input ids read on the device (ForwardBatch.sourced) are the same tokens everywhere.

    rank 0 (EngineCore)                         rank r > 0 (serve_steps)
    schedule -> table writes, ForwardBatch
    send StepMessage  ------- control ------->  apply table writes
    forward (all-reduce, all-gather) <------->  forward
    sample; broadcast tokens ---- device ---->  keep the tokens (the next step's sourced ids)
    process (detokenize, stops, tree)

While the engine is idle rank 0 sends an empty message every dist_timeout / 4 seconds, so
that a rank waiting for the next step hears from rank 0 within the timeout, and gives up
(exits) only when rank 0 is gone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from radixserve.engine.config import EngineConfig, section
from radixserve.model_runner.config import RunnerConfig
from radixserve.model_runner.cpu_threads import default_cpu_threads
from radixserve.model_runner.forward_batch import ForwardBatch
from radixserve.model_runner.model_runner import TORCH_DTYPES, ModelRunner
from radixserve.model_runner.parallel import Rendezvous, TPComm, leave

logger = logging.getLogger(__name__)


class StepMessage(NamedTuple):
    """What rank 0 sends the other ranks before each step (and while idle)."""

    batch: ForwardBatch | None  # None: nothing to run (a heartbeat, or stop)
    table_writes: list[torch.Tensor]  # ReqToTokenPool.log: [3, n] (rows, columns, slots) each
    sampled: int  # tokens rank 0 samples after this forward and broadcasts (0: none)
    stop: bool = False


def exchange(comm: TPComm, message: StepMessage | None) -> StepMessage:
    """Rank 0's message on every rank (rank 0 passes it, the others None)."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=comm.control)
    received = box[0]
    if not isinstance(received, StepMessage):
        raise RuntimeError(f"tensor-parallel rank {comm.rank} received {type(received).__name__}, not a step")
    return received


def share_tokens(comm: TPComm, tokens: torch.Tensor) -> torch.Tensor:
    """Rank 0's sampled tokens on every rank (in place on rank 0; `tokens` is the buffer elsewhere)."""
    return comm.broadcast(tokens)


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """The device of this process's rank: `name` (default cuda when available); with several
    ranks on one host, CUDA rank i takes the i-th GPU after the one named."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here")
    if device.type == "cuda":
        index = (device.index or 0) + local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"tensor-parallel local rank {local_rank} needs GPU {index}; "
                             f"{torch.cuda.device_count()} are visible")
        device = torch.device("cuda", index)
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def cascade_min_prefix(config: EngineConfig, runner: ModelRunner) -> int:
    """The shortest prefix that forms a cascade group, 0 with cascade attention off.
    None (auto) is on for CUDA where the backend supports it."""
    supported = runner.backend.supports_cascade
    if config.cascade_attention is None:
        on = runner.device.type == "cuda" and supported
    elif config.cascade_attention and not supported:
        raise ValueError(
            f"cascade_attention needs an attention backend that supports it (fa4, torch), "
            f"got {runner.backend.name!r}"
        )
    else:
        on = config.cascade_attention
    return config.cascade_min_prefix if on else 0


def start_runner(
    config: EngineConfig, model_path: Path, device: torch.device, dtype: torch.dtype, comm: TPComm | None
) -> tuple[ModelRunner, int]:
    """Build the runner and capture/warm up what it will run (every rank does this in the same
    order: captures and warm-up steps run collectives). Returns it and cascade_min_prefix."""
    runner = ModelRunner(model_path, device=device, dtype=dtype, config=section(config, RunnerConfig), comm=comm)
    min_prefix = cascade_min_prefix(config, runner)
    if min_prefix and runner.graphs is not None:
        runner.graphs.cascade_graphs()  # capture now: not in the middle of serving
    runner.warm_up(min_prefix)  # likewise
    return runner, min_prefix


def serve_steps(runner: ModelRunner, comm: TPComm) -> None:
    """A rank > 0: run every step rank 0 sends until it says stop (or the group fails: raises)."""
    last_tokens: torch.Tensor | None = None
    while True:
        message = exchange(comm, None)
        if message.stop:
            return
        for packed in message.table_writes:
            runner.req_to_token.apply(packed)
        batch = message.batch
        if batch is None:
            continue
        if batch.sourced is not None:
            batch.input_source = last_tokens
        runner.forward(batch)
        if message.sampled:
            last_tokens = share_tokens(comm, torch.empty(message.sampled, dtype=torch.int64, device=runner.device))


def run_rank(config: EngineConfig, model_path: Path, rendezvous: Rendezvous, local_rank: int) -> None:
    """A spawned rank's process: join the group, build the runner, serve steps until stop.
    Any failure is logged and ends the process with a non-zero exit code (rank 0 sees the
    rank gone, or its collective fails, and the engine fails: EngineFatalError)."""
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rendezvous.rank}] %(levelname)s %(message)s")
    try:
        device = resolve_device(config.device, local_rank)
        if device.type == "cuda":  # this process serves this one GPU
            torch.cuda.set_device(device)
        if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            # The host's CPUs shared by its ranks (cpu_threads.py leaves one to the host work).
            threads = max(1, default_cpu_threads() * config.nnodes // config.tensor_parallel_size)
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        comm = rendezvous.join(device)
        try:
            runner, _ = start_runner(config, model_path, device, resolve_dtype(config.dtype, device), comm)
            with torch.inference_mode():
                serve_steps(runner, comm)
        finally:
            leave(5.0)  # the process exits next: never wait long for a teardown
    except BaseException as exc:
        logger.critical("tensor-parallel rank %d failed: %s", rendezvous.rank, exc, exc_info=exc)
        raise SystemExit(1) from exc
