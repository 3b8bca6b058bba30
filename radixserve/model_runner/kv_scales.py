"""FP8 KV cache scales stored in a checkpoint (llm-compressor, ModelOpt and older FP8 exports).

Names per layer N, as vLLM reads them:

    model.layers.N.self_attn.k_scale / v_scale           (llm-compressor / compressed-tensors)
    model.layers.N.self_attn.k_proj.k_scale / v_proj.v_scale   (NVIDIA ModelOpt)
    model.layers.N.self_attn.kv_scale                     (older exports: one scale for K and V)

Each is a scalar (one scale for every head) or `[num_key_value_heads]` (one per head),
meaning real value = stored e4m3 value * scale. The model's weight loader skips these
tensors (`is_kv_scale`); an fp8 pool takes them, sliced to the KV heads a
tensor-parallel rank holds.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from radixserve.model_runner.kv_pool import KVScales

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:k_proj\.(?=k_)|v_proj\.(?=v_))?(k|v|kv)_scale$")


def is_kv_scale(name: str) -> bool:
    """Whether a checkpoint tensor is a KV cache scale (not a model weight)."""
    return _NAME.match(name) is not None


def load_kv_scales(
    files: list[Path], num_layers: int, num_kv_heads: int, first_head: int, local_heads: int
) -> KVScales | None:
    """The checkpoint's K and V scales `[num_layers, local_heads]` for KV heads
    `first_head .. first_head + local_heads`, or None where it stores none.
    A checkpoint with scales for some layers or for K only, a scale of another shape, or
    one not finite and > 0 is a ValueError naming the tensor."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                m = _NAME.match(name)
                if m is None:
                    continue
                layer, kind = int(m.group(1)), m.group(2)
                t = f.get_tensor(name).float().reshape(-1)
                if t.numel() not in (1, num_kv_heads):
                    raise ValueError(
                        f"KV scale {name!r} has {t.numel()} values, expected 1 or num_key_value_heads ({num_kv_heads})"
                    )
                if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                    raise ValueError(f"KV scale {name!r} must be finite and > 0, got {t.tolist()}")
                t = t.expand(num_kv_heads)[first_head : first_head + local_heads]
                for which in ("k", "v") if kind == "kv" else (kind,):
                    if (layer, which) in found:
                        raise ValueError(f"the checkpoint has two {which}_scale tensors for layer {layer}")
                    found[(layer, which)] = t
    if not found:
        return None
    extra = sorted({i for i, _ in found if i >= num_layers})
    if extra:
        raise ValueError(f"the checkpoint has KV cache scales for layers {extra}, the model has {num_layers}")
    missing = [
        f"{which}_scale of layer {i}" for i in range(num_layers) for which in ("k", "v") if (i, which) not in found
    ]
    if missing:
        shown = ", ".join(missing[:4]) + (f", ... and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"the checkpoint has KV cache scales for some layers but lacks {shown}")
    k = torch.stack([found[(i, "k")] for i in range(num_layers)])
    v = torch.stack([found[(i, "v")] for i in range(num_layers)])
    return KVScales(k, v)
