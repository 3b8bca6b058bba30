"""Model implementations, chosen by the checkpoint's architecture name.

`build_model(config, device, dtype)` returns the model with uninitialized
weights (the loader fills them), its RoPE cache computed and, for
mixture-of-experts models, its expert implementation chosen (`moe_backend`).
"""

from __future__ import annotations

import torch

from radixserve.model_runner.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from radixserve.model_runner.models.decoder import AttentionFn, DecoderForCausalLM, WeightTarget
from radixserve.model_runner.models.moe import MOE_BACKENDS, Qwen3MoeForCausalLM
from radixserve.model_runner.parallel import TPComm

_MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def build_model(
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    moe_backend: str = "auto",
    comm: TPComm | None = None,
) -> DecoderForCausalLM:
    """The model for config.architecture on device, parameters in dtype (default config.dtype).

    Parameters are allocated but not initialized: load weights before use.
    The model is in eval mode with gradients off. moe_backend (one of MOE_BACKENDS)
    picks how MoE models compute their experts; dense models have none to compute.
    comm (tensor parallelism): the model holds its rank's share of the weights.
    """
    if moe_backend not in MOE_BACKENDS:
        raise ValueError(f"moe_backend must be one of {', '.join(MOE_BACKENDS)}; got {moe_backend!r}")
    cls = _MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise ValueError(
            f"unsupported architecture {config.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    dtype = dtype or config.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    # Build on the meta device (no memory, no random init), then allocate on the target device.
    with torch.device("meta"):
        model = cls(config, dtype, comm)
    model = model.to_empty(device=device)
    model.rotary.set_frequencies(*config.rope_frequencies())
    model.reset_moe_stats()  # its counters were allocated uninitialized too
    if isinstance(model, Qwen3MoeForCausalLM):
        model.set_moe_backend(moe_backend)
    model.requires_grad_(False)
    return model.eval()


__all__ = ["AttentionFn", "DecoderForCausalLM", "MOE_BACKENDS", "Qwen3MoeForCausalLM", "WeightTarget", "build_model"]
