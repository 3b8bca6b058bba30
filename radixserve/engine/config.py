"""The engine's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

EVICTION_POLICIES = ("lru", "lfu", "fifo", "priority")
SCHEDULE_POLICIES = ("fcfs", "lpm")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
FOLD_MODES = ("off", "mlp", "tree")
BATCH_ORDERS = ("prefix", "arrival")
MOE_BACKENDS = ("auto", "grouped_mm", "loop")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine; `Engine(**config)` takes these names."""

    model: str | None = None  # a Hugging Face directory; None: the built-in SmolLM2-135M-Instruct
    device: str | None = None  # "cpu" | "cuda" | "cuda:N"; None: cuda when available
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU
    enable_prefix_cache: bool = True
    max_running_requests: int = 64
    max_prefill_tokens: int = 2048  # prefill tokens per step; longer prompts are chunked
    kv_cache_tokens: int | None = None  # KV pool size; None: 16384 on CPU, from free memory on GPU
    gpu_memory_utilization: float = 0.85
    max_context: int | None = None  # None: the model's max_position_embeddings
    eviction_policy: str = "lru"
    schedule_policy: str = "fcfs"
    # LPM: a waiting request gains this many "matched tokens" per step waited,
    # so a cache miss always overtakes eventually.
    lpm_aging_tokens_per_step: int = 16
    page_size: int = 1
    # Within-batch folding of shared uncached prefixes (see scheduler/batch_builder.py).
    fold_mode: str | None = None  # None: "tree" when page_size is 1, else "mlp"
    fold_threshold: float = 0.95  # fold a batch only when computed rows / tokens is below this
    # Order of running requests in a batch. "prefix": requests sharing KV slots (a cached or
    # folded prefix) sit side by side, so the GPU reads the shared K/V once into L2 for all of
    # them instead of once each from memory. "arrival": admission order.
    batch_order: str = "prefix"
    attention_backend: str = "auto"
    # Replay captured CUDA graphs for decode steps (batch-size buckets up to max_running_requests):
    # needs device cuda, the fa4 backend and a bf16/fp16 dense model; capture costs seconds at start.
    cuda_graphs: bool | None = None  # decode under CUDA graphs; None: wherever supported (fa4, bf16/fp16, dense)
    # Prefill and mixed steps replay the model between attention calls as captured pieces
    # (row buckets up to piecewise_max_rows; attention runs eagerly): same needs as
    # cuda_graphs. None: on wherever decode graphs are; False: eager.
    piecewise_graphs: bool | None = None
    # The most rows (prefill chunk tokens + decodes) a step replays pieces for; bigger steps
    # run eagerly. None: max_prefill_tokens + max_running_requests, at most 8,192.
    piecewise_max_rows: int | None = None
    # Build the next decode step while the GPU runs this one (runs of plain decode steps
    # only; a request ending on a stop token decodes once more, discarded). None: on for CUDA.
    overlap_schedule: bool | None = None
    # Fuse the position-wise math (norms, RoPE, SiLU) with torch.compile: compiles for
    # ~20-60 s at start; None: on for CUDA devices (where launches dominate small batches).
    fused_kernels: bool | None = None
    # Cascade attention: running requests that share a prefix's KV slots attend to it once per
    # group, then each to its own suffix, merged by log-sum-exp (attention/cascade.py). Needs a
    # backend that supports it (fa4, torch). None: on for CUDA. Groups need a shared prefix of
    # at least cascade_min_prefix tokens.
    cascade_attention: bool | None = None
    cascade_min_prefix: int = 256
    # Decode passes (one query row per sequence) of the fa4 backend run our Triton split-KV
    # kernel (attention/triton_decode.py). None: where Triton is installed; True: required.
    triton_decode: bool | None = None
    moe_backend: str = "auto"  # Qwen3-MoE expert computation: "auto" | "grouped_mm" | "loop"
    seed: int | None = None  # seeds the draws of per-request seeds for unseeded requests
    check_invariants: bool = False  # verify slot ownership and the tree after every step
    show_progress: bool = True  # progress bars while converting and loading weights

    def __post_init__(self) -> None:
        _check_int(self, "max_running_requests", 1)
        _check_int(self, "max_prefill_tokens", 1)
        _check_int(self, "page_size", 1)
        _check_int(self, "lpm_aging_tokens_per_step", 0)
        if self.kv_cache_tokens is not None:
            _check_int(self, "kv_cache_tokens", 1)
        if self.max_context is not None:
            _check_int(self, "max_context", 2)
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None (auto), True or False, got {self.cuda_graphs!r}")
        if self.piecewise_graphs is not None and not isinstance(self.piecewise_graphs, bool):
            raise ValueError(f"piecewise_graphs must be None (auto), True or False, got {self.piecewise_graphs!r}")
        if self.overlap_schedule is not None and not isinstance(self.overlap_schedule, bool):
            raise ValueError(f"overlap_schedule must be None (auto), True or False, got {self.overlap_schedule!r}")
        if self.fused_kernels is not None and not isinstance(self.fused_kernels, bool):
            raise ValueError(f"fused_kernels must be None (auto), True or False, got {self.fused_kernels!r}")
        if self.cascade_attention is not None and not isinstance(self.cascade_attention, bool):
            raise ValueError(f"cascade_attention must be None (auto), True or False, got {self.cascade_attention!r}")
        _check_int(self, "cascade_min_prefix", 1)
        if self.piecewise_max_rows is not None:
            _check_int(self, "piecewise_max_rows", 1)
        if self.triton_decode is not None and not isinstance(self.triton_decode, bool):
            raise ValueError(f"triton_decode must be None (auto), True or False, got {self.triton_decode!r}")
        if not isinstance(self.enable_prefix_cache, bool):
            raise ValueError(f"enable_prefix_cache must be a bool, got {self.enable_prefix_cache!r}")
        if not 0.0 < float(self.gpu_memory_utilization) <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _check_choice(self, "eviction_policy", EVICTION_POLICIES)
        _check_choice(self, "moe_backend", MOE_BACKENDS)
        _check_choice(self, "schedule_policy", SCHEDULE_POLICIES)
        _check_choice(self, "batch_order", BATCH_ORDERS)
        if self.fold_mode is None:
            object.__setattr__(self, "fold_mode", "tree" if self.page_size == 1 else "mlp")
        _check_choice(self, "fold_mode", FOLD_MODES)
        if isinstance(self.fold_threshold, bool) or not 0.0 < float(self.fold_threshold) <= 1.0:
            raise ValueError(f"fold_threshold must be in (0, 1], got {self.fold_threshold!r}")
        if self.fold_mode == "tree" and self.page_size != 1:
            raise ValueError("fold_mode 'tree' shares KV slots token by token and needs page_size 1")
        if self.dtype is not None:
            _check_choice(self, "dtype", DTYPES)
        if self.device is not None and self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES} (optionally 'cuda:N'), got {self.device!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from keyword options; an unknown option is an error, never dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**kwargs)


def _check_int(cfg: EngineConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(cfg: EngineConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
