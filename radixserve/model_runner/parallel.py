"""Tensor parallelism: which share of the model a rank holds, and the collectives between ranks.

Megatron-style sharding, one rank per device:

    qkv_proj      column-parallel by heads: rank r holds query heads [r*Hq/n, (r+1)*Hq/n) and the
                  KV heads they read (Hkv/n of them when Hkv >= n; else one, shared by n/Hkv ranks)
    o_proj        row-parallel over the same heads: one all-reduce
    gate_up_proj  column-parallel over the intermediate dim; down_proj row-parallel: one all-reduce
    MoE experts   every expert's intermediate dim split the same way; one all-reduce per block
    embed_tokens  vocabulary-parallel: each rank looks up its rows, one all-reduce
    lm_head       vocabulary-parallel: each rank's logit columns, one all-gather

`TPShard` is the arithmetic only (no process group: the loader and tests use it as is);
`TPComm` runs the collectives over a torch.distributed group. A model built with
`TPShard(0, 1)` and no comm is the unsharded model, with no collective and no extra copy.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from radixserve.model_runner.model_config import ModelConfig

logger = logging.getLogger(__name__)

# all_gather_single is the newer name of all_gather_into_tensor (same arguments).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TPShard:
    """Rank `rank` of `size` ranks: which slice of each sharded dimension it holds."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.size})")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, count) of this rank's even share of `total` (ValueError unless `size` divides it)."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} must divide the model's {what} ({total})")
        count = total // self.size
        return self.rank * count, count

    def heads(self, config: ModelConfig) -> tuple[int, int]:
        """(first, count) of this rank's query heads."""
        return self.split(config.num_heads, "num_attention_heads")

    def kv_heads(self, config: ModelConfig) -> tuple[int, int]:
        """(first, count) of the KV heads this rank holds: its share when there are at least as
        many KV heads as ranks, else the one KV head its query heads read (replicated over the
        `size / num_kv_heads` ranks that share it)."""
        kv = config.num_kv_heads
        if kv >= self.size:
            return self.split(kv, "num_key_value_heads")
        if self.size % kv:
            raise ValueError(
                f"tensor_parallel_size {self.size} must divide or be a multiple of the model's "
                f"num_key_value_heads ({kv})"
            )
        return self.rank // (self.size // kv), 1

    def check(self, config: ModelConfig) -> None:
        """ValueError naming the first dimension that `size` ranks cannot share."""
        if not self.enabled:
            return
        self.heads(config)
        self.kv_heads(config)
        self.split(config.vocab_size, "vocab_size")
        self.split(config.intermediate_size, "intermediate_size")
        if config.num_experts:
            self.split(config.moe_intermediate_size, "moe_intermediate_size")
        # With fewer KV heads than ranks, size / Hkv ranks share a KV head and each one's
        # Hq / size query heads lie inside that head's group of Hq / Hkv: the shares nest.


class TPComm:
    """The collectives of one tensor-parallel group over torch.distributed.

    `group` carries the tensors (NCCL on CUDA, gloo on the CPU); every call is a device-side
    collective, so CUDA graphs capture it. `control` (gloo) carries the host-side messages
    of the driver (each step's batch); it never runs inside a captured region.
    """

    def __init__(self, shard: TPShard, group: dist.ProcessGroup | None, control: dist.ProcessGroup | None) -> None:
        self.shard = shard
        self.group = group
        self.control = control

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def size(self) -> int:
        return self.shard.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (returns x)."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] per rank -> [N, size * C], rank r's columns at [r*C, (r+1)*C)."""
        x = x.contiguous()
        out = x.new_empty((self.size * x.shape[0], x.shape[1]))
        _ALL_GATHER(out, x, group=self.group)
        return out.view(self.size, x.shape[0], x.shape[1]).permute(1, 0, 2).reshape(x.shape[0], -1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place (returns x)."""
        dist.broadcast(x, src=self.group_src(), group=self.group)
        return x

    def group_src(self) -> int:
        """The global rank of this group's rank 0."""
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def min_int(self, value: int) -> int:
        """The least of every rank's `value` (over the control group: a host value)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the ranks of one engine meet (the standard torch.distributed TCP rendezvous)."""

    init_addr: str  # host:port of global rank 0
    world_size: int
    rank: int
    timeout_s: float

    def join(self, device: torch.device) -> TPComm:
        """Join the process group (this process's default group) and make the comm for this rank."""
        if dist.is_initialized():
            raise RuntimeError(
                "this process already holds a torch.distributed process group: one tensor-parallel engine "
                "per process (shut the other down first)"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.timeout_s)
        dist.init_process_group(backend, init_method=f"tcp://{self.init_addr}", world_size=self.world_size,
                                rank=self.rank, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        group = dist.group.WORLD
        control = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        return TPComm(TPShard(self.rank, self.world_size), group, control)


def leave(wait_s: float = 30.0) -> bool:
    """Leave the process group joined by Rendezvous.join (nothing when none is held); False
    when tearing it down did not finish within `wait_s` (then it is left behind).

    The teardown runs on a thread of its own: destroying an NCCL group whose collectives were
    captured in CUDA graphs, or whose peers are gone, can block (pytorch/pytorch#115388), and
    shutting an engine down must not."""
    if not dist.is_initialized():
        return True
    done = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group may fail to tear down; the ranks are gone either way
            logger.debug("destroying the process group failed", exc_info=True)
        done.set()

    threading.Thread(target=destroy, name="radixserve-tp-leave", daemon=True).start()
    if not done.wait(wait_s):
        logger.warning("the tensor-parallel process group did not tear down within %.0f s; left behind", wait_s)
        return False
    return True
