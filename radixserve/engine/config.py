"""The engine's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from radixserve.model_runner.config import DTYPES, KV_CACHE_DTYPE_ALIASES, KV_CACHE_DTYPES, MOE_BACKENDS
from radixserve.radix_tree.policies import POLICIES
from radixserve.scheduler.fold_plan import FOLD_MODES
from radixserve.scheduler.policy import BATCH_ORDERS, SCHEDULE_POLICIES

T = TypeVar("T")

EVICTION_POLICIES = tuple(POLICIES)
DEVICES = ("cpu", "cuda")


def _opt(
    default: Any, help_text: str, choices: tuple[str, ...] | None = None, *, flag: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A field with what the command line shows for it (engine/options.py makes one flag per field,
    plus its `aliases`, each a whole flag such as "--tp")."""
    return field(default=default, metadata={"help": help_text, "choices": choices, "flag": flag, "aliases": aliases})


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine; `Engine(**config)` takes these names."""

    model: str | None = _opt(None, "a Hugging Face model directory (config.json, safetensors, tokenizer); "
                             "default: the built-in SmolLM2-135M-Instruct")
    device: str | None = _opt(None, "cpu | cuda | cuda:N; default: cuda when available")
    dtype: str | None = _opt(None, "weights and activations; default: float32 on CPU, bfloat16 on GPU", DTYPES)
    enable_prefix_cache: bool = _opt(True, "keep every computed prefix's KV in the radix tree for later requests",
                                     flag="prefix-cache")
    max_running_requests: int = _opt(64, "sequences running at once (decode batch size)")
    max_prefill_tokens: int = _opt(2048, "prefill tokens per step; longer prompts are computed in chunks")
    kv_cache_tokens: int | None = _opt(None, "KV pool size in tokens; default: 16384 on CPU, from free memory on GPU")
    kv_cache_dtype: str = _opt(
        "auto", "KV cache storage: auto (the model dtype) or fp8_e4m3 (alias fp8: one byte per value, twice the "
                "cached tokens in the same memory; scales from the checkpoint's k_scale/v_scale, else 1.0)",
        (*KV_CACHE_DTYPES, *KV_CACHE_DTYPE_ALIASES))
    gpu_memory_utilization: float = _opt(0.85, "share of GPU memory the engine may hold (weights, KV pool, graphs)")
    max_context: int | None = _opt(None, "the longest prompt + output; default: the model's max_position_embeddings")
    eviction_policy: str = _opt("lru", "which cached prefixes go first when the KV pool is full", EVICTION_POLICIES)
    schedule_policy: str = _opt("fcfs", "admission order: arrival, or longest cached prefix first (with aging)",
                                SCHEDULE_POLICIES)
    lpm_aging_tokens_per_step: int = _opt(
        16, "lpm: a waiting request gains this many 'matched tokens' per step waited (a miss overtakes eventually)")
    page_size: int = _opt(1, "tokens per radix tree page (cached prefixes match whole pages)")
    fold_mode: str | None = _opt(
        None, "within-batch folding of shared uncached prefixes: off, mlp (computed once), tree (computed once "
              "and KV slots shared); default: tree with page_size 1, else mlp", FOLD_MODES)
    fold_threshold: float = _opt(0.95, "fold a batch only when its computed rows / tokens is below this")
    # "prefix": requests sharing KV slots (a cached or folded prefix) sit side by side, so the GPU
    # reads the shared K/V once into L2 for all of them instead of once each from memory.
    batch_order: str = _opt("prefix", "order of a batch's requests: those sharing KV side by side, or admission "
                                      "order", BATCH_ORDERS)
    attention_backend: str = _opt("auto", "fa4 | torch_varlen | torch | cpu (auto: the fastest that runs here)")
    cuda_graphs: bool | None = _opt(
        None, "replay decode steps as captured CUDA graphs (needs cuda, fa4, bf16/fp16, a dense model; capture "
              "costs seconds at start); default: wherever supported")
    piecewise_graphs: bool | None = _opt(
        None, "replay prefill and mixed steps as captured graph pieces between attention calls (attention "
              "eager); default: wherever decode graphs run")
    piecewise_max_rows: int | None = _opt(
        None, "the most rows (prefill tokens + decodes) a step replays pieces for; bigger steps run eagerly; "
              "default: max_prefill_tokens + max_running_requests, at most 8,192")
    overlap_schedule: bool | None = _opt(
        None, "build the next step while the GPU runs this one; default: on for CUDA")
    fused_kernels: bool | None = _opt(
        None, "fuse norms, RoPE and SiLU with torch.compile (compiles ~20-60 s at start); default: on for CUDA")
    cascade_attention: bool | None = _opt(
        None, "requests sharing a prefix's KV attend to it once per group, then each to its own suffix (needs "
              "fa4 or torch); default: on for CUDA")
    cascade_min_prefix: int = _opt(256, "the shortest shared prefix (tokens) that forms a cascade group")
    triton_decode: bool | None = _opt(
        None, "decode attention (and a decode step's cascade prefix pass) through the Triton split-KV kernels; "
              "default: where Triton is installed")
    moe_backend: str = _opt("auto", "Qwen3-MoE expert computation", MOE_BACKENDS)
    max_logprobs: int = _opt(
        20, "the most top alternatives a request's logprobs or prompt_logprobs may ask for per position; -1: no "
            "limit (a request may then ask for -1, the whole vocabulary: one float per vocabulary entry and "
            "position in the response)")
    tensor_parallel_size: int = _opt(
        1, "ranks (GPUs, or CPU processes) that each hold a share of every layer (Megatron-style); the engine "
           "starts ranks 1..N-1 on this host itself", aliases=("--tp",))
    nnodes: int = _opt(1, "hosts the tensor-parallel ranks span (each runs tensor_parallel_size / nnodes of them)")
    node_rank: int = _opt(0, "this host's index among nnodes; 0 serves, the others run their ranks only")
    dist_init_addr: str | None = _opt(
        None, "host:port of rank 0 for the torch.distributed rendezvous; default: a free port on 127.0.0.1 "
              "(needed with nnodes > 1)")
    dist_timeout: float = _opt(
        300.0, "seconds a collective or a rank's start may take before the engine fails (EngineFatalError)")
    seed: int | None = _opt(None, "seeds the per-request seeds drawn for unseeded requests", flag="engine-seed")
    check_invariants: bool = _opt(False, "verify slot ownership and the radix tree after every step (slow)")
    show_progress: bool = _opt(True, "progress bars while converting and loading weights")

    def __post_init__(self) -> None:
        _check_int(self, "max_running_requests", 1)
        _check_int(self, "max_prefill_tokens", 1)
        _check_int(self, "page_size", 1)
        _check_int(self, "lpm_aging_tokens_per_step", 0)
        _check_int(self, "max_logprobs", -1)
        self._check_distributed()
        if self.kv_cache_tokens is not None:
            _check_int(self, "kv_cache_tokens", 1)
        if self.max_context is not None:
            _check_int(self, "max_context", 2)
        if isinstance(self.kv_cache_dtype, str) and self.kv_cache_dtype in KV_CACHE_DTYPE_ALIASES:
            object.__setattr__(self, "kv_cache_dtype", KV_CACHE_DTYPE_ALIASES[self.kv_cache_dtype])
        _check_choice(self, "kv_cache_dtype", KV_CACHE_DTYPES)
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

    def _check_distributed(self) -> None:
        _check_int(self, "tensor_parallel_size", 1)
        _check_int(self, "nnodes", 1)
        _check_int(self, "node_rank", 0)
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(
                f"nnodes ({self.nnodes}) must divide tensor_parallel_size ({self.tensor_parallel_size})")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if self.dist_init_addr is not None:
            host, _, port = str(self.dist_init_addr).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dist_init_addr must be host:port, got {self.dist_init_addr!r}")
        elif self.nnodes > 1:
            raise ValueError("dist_init_addr (rank 0's host:port) is needed when nnodes > 1")
        timeout = self.dist_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"dist_timeout must be a number of seconds > 0, got {timeout!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
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


def section(config: EngineConfig, cls: type[T], **resolved: Any) -> T:
    """The part of `config` that a component takes whole: the dataclass `cls` filled from the
    options of the same names, with `resolved` (what the engine works out at start, such as the
    model's context length) given directly. Every field of `cls` must be one or the other."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: getattr(config, n) for n in names if n not in resolved}, **resolved)
