"""The model runner's section of the engine's configuration.

`EngineConfig` (engine/config.py) holds every option with its default and help text;
the engine hands the runner this section whole (`engine.config.section`), so no option
has a second default here.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")  # weights and activations (model_runner.TORCH_DTYPES)
MOE_BACKENDS = ("auto", "grouped_mm", "loop")  # Qwen3-MoE expert computation (models/moe.py)
# KV pool storage: "auto" stores the model dtype; "fp8_e4m3" one byte per value with a scale per
# layer and KV head (kv_pool.py). "fp8" is vLLM's name for fp8_e4m3, accepted as an alias.
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
KV_CACHE_DTYPE_ALIASES = {"fp8": "fp8_e4m3"}


@dataclass(frozen=True)
class RunnerConfig:
    max_running_requests: int  # table rows, and the largest decode graph
    max_prefill_tokens: int  # bounds the largest step that graph pieces are captured for
    max_context: int | None  # None: the model's max_position_embeddings
    kv_cache_tokens: int | None  # None: a CPU default, or from free GPU memory
    kv_cache_dtype: str  # KV_CACHE_DTYPES
    gpu_memory_utilization: float
    attention_backend: str
    moe_backend: str
    cuda_graphs: bool | None
    piecewise_graphs: bool | None
    piecewise_max_rows: int | None
    fused_kernels: bool | None
    triton_decode: bool | None
    cascade_attention: bool | None  # False: no backend groups shared prefixes on its own either
    show_progress: bool
