"""What the model runner needs to know about a checkpoint, read from its config.json.

`ModelConfig.from_pretrained(path)` parses a Hugging Face directory with
transformers' `AutoConfig` and keeps the handful of numbers the decoder needs,
named the same for every supported family. RoPE frequencies come from
transformers' own init functions (`ROPE_INIT_FUNCTIONS`), so every scaling
scheme they implement is honoured exactly as transformers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)

# Rope types whose frequencies do not depend on the batch: computed once for
# positions [0, max_position_embeddings) they equal what transformers computes.
# ("dynamic" rescales only past max_position_embeddings, which the cos/sin cache
# never reaches; "longrope" switches frequency sets with the batch's length,
# which a KV cache cannot follow, so it is refused.)
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture numbers of one checkpoint, shared by all decoder families.

    Family differences are flags: `qk_norm` (Qwen3, Qwen3-MoE: per-head RMSNorm on
    q and k before RoPE), `qkv_bias` (Qwen2 always; Llama/Qwen3 when `attention_bias`),
    `o_proj_bias` (Llama/Qwen3 `attention_bias`), `mlp_bias` (Llama).

    Mixture of experts (Qwen3-MoE): `moe_layers` lists the layers whose MLP is a
    sparse block of `num_experts` SwiGLU experts of width `moe_intermediate_size`,
    `num_experts_per_tok` of them per token, their router weights renormalised to
    sum to 1 when `norm_topk_prob`; the other layers keep a dense MLP of
    `intermediate_size`. Dense families have `num_experts == 0` and no moe_layers.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_type: str
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: torch.dtype
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()
    path: Path | None = None
    # The transformers config the numbers came from; RoPE init functions take it.
    hf_config: Any = field(default=None, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether layer `layer_id`'s MLP is the sparse mixture of experts."""
        return layer_id in self.moe_layers

    @property
    def softmax_scale(self) -> float:
        """The scale attention backends apply to q.k (RoPE scaling is already in q, k)."""
        return self.head_dim**-0.5

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `path`/config.json (and generation_config.json for extra eos ids)."""
        from transformers import AutoConfig

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model path {str(path)!r} is not a directory")
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())
            raise ValueError(
                f"model directory {str(path)!r} has no config.json (found: {found}); "
                "expected a Hugging Face model directory (config.json + safetensors)"
            )
        hf_config = AutoConfig.from_pretrained(path)
        return cls.from_hf_config(hf_config, path=path)

    @classmethod
    def from_hf_config(cls, hf: Any, path: Path | None = None) -> ModelConfig:
        """Build from a transformers config object (validates the architecture)."""
        architectures = getattr(hf, "architectures", None) or []
        architecture = architectures[0] if architectures else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            where = f" in {str(path / 'config.json')!r}" if path is not None else ""
            raise ValueError(
                f"unsupported architecture {architecture!r}{where} "
                f"(model_type {getattr(hf, 'model_type', None)!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        _check_supported_features(hf, architecture)
        rope = rope_parameters(hf)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        attention_bias = bool(getattr(hf, "attention_bias", False))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        return cls(
            architecture=architecture,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_type=rope["rope_type"],
            rope_theta=float(rope["rope_theta"]),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 hard-codes bias on q/k/v and none on o; the others follow attention_bias.
            qkv_bias=True if is_qwen2 else attention_bias,
            o_proj_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            eos_token_ids=_eos_token_ids(hf, path),
            bos_token_id=getattr(hf, "bos_token_id", None),
            dtype=_torch_dtype(hf),
            **_moe_fields(hf, architecture),
            path=path,
            hf_config=hf,
        )

    def rope_frequencies(self) -> tuple[torch.Tensor, float]:
        """(inv_freq float32 [head_dim // 2], attention_scaling), as transformers computes them.

        attention_scaling (yarn's mscale, 1.0 for most types) multiplies cos and sin.
        """
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type != "default":
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        elif "default" in ROPE_INIT_FUNCTIONS:  # transformers 4.x
            init_fn = ROPE_INIT_FUNCTIONS["default"]
        else:  # transformers 5 moved "default" into each model class: the plain RoPE formula
            init_fn = _default_rope_parameters
        inv_freq, attention_scaling = init_fn(self.hf_config, torch.device("cpu"))
        return inv_freq.float(), float(attention_scaling)


def rope_parameters(hf: Any) -> dict[str, Any]:
    """The flat rope dict (rope_type, rope_theta, factor...) of transformers 4 or 5 configs."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:  # transformers 4: rope_theta + optional rope_scaling
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _default_rope_parameters(hf: Any, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    # Same expression as transformers 5's `compute_default_rope_parameters`.
    base = rope_parameters(hf)["rope_theta"]
    dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    return inv_freq, 1.0


def moe_layer_ids(hf: Any) -> tuple[int, ...]:
    """The layers transformers builds as sparse MoE blocks (Qwen3MoeDecoderLayer's rule, verbatim):
    not in `mlp_only_layers`, `num_experts > 0`, and `(layer + 1) % decoder_sparse_step == 0`."""
    num_experts = getattr(hf, "num_experts", 0) or 0
    step = getattr(hf, "decoder_sparse_step", 1)
    mlp_only = set(getattr(hf, "mlp_only_layers", None) or [])
    return tuple(
        layer for layer in range(hf.num_hidden_layers)
        if layer not in mlp_only and num_experts > 0 and (layer + 1) % step == 0
    )


def _moe_fields(hf: Any, architecture: str) -> dict[str, Any]:
    if architecture != "Qwen3MoeForCausalLM":
        return {}
    num_experts = getattr(hf, "num_experts", 0) or 0
    top_k = getattr(hf, "num_experts_per_tok", 0) or 0
    step = getattr(hf, "decoder_sparse_step", 1)
    if num_experts > 0:  # transformers would divide by zero, or fail in topk, later on
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"{architecture}: decoder_sparse_step must be an integer >= 1, got {step!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"{architecture}: num_experts_per_tok must be in [1, num_experts={num_experts}], got {top_k!r}"
            )
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=hf.moe_intermediate_size,
        norm_topk_prob=bool(hf.norm_topk_prob),
        moe_layers=moe_layer_ids(hf),
    )


def _check_supported_features(hf: Any, architecture: str) -> None:
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{architecture}: hidden_act {act!r} is not supported (only 'silu')")
    layer_types = getattr(hf, "layer_types", None) or []
    if getattr(hf, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"{architecture}: sliding-window attention (use_sliding_window / layer_types) is not supported"
        )
    rope = rope_parameters(hf)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{architecture}: rope_type {rope['rope_type']!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        raise ValueError(f"{architecture}: partial_rotary_factor {partial} is not supported (only 1.0)")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _eos_token_ids(hf: Any, path: Path | None) -> tuple[int, ...]:
    """config.json's eos ids, then generation_config.json's (chat models often add their turn end there)."""
    ids = _as_id_list(getattr(hf, "eos_token_id", None))
    gen_path = path / "generation_config.json" if path is not None else None
    if gen_path is not None and gen_path.is_file():
        ids += _as_id_list(json.loads(gen_path.read_text()).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))  # unique, first-seen order


def _torch_dtype(hf: Any) -> torch.dtype:
    dtype = getattr(hf, "dtype", None)
    if dtype is None and "torch_dtype" in getattr(hf, "__dict__", {}):  # transformers 4
        dtype = hf.torch_dtype
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype
