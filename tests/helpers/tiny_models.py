"""Tiny random Hugging Face checkpoints for tests (built with transformers, fixed seed).

Each `make_tiny_*` writes config.json + safetensors (+ generation_config.json)
and, unless `with_tokenizer=False`, a byte-level tokenizer with a ChatML
template whose ids fit the tiny vocabulary (bytes 0-255, then the specials),
so engine tests can go from text to tokens and back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_VOCAB = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 256, 257, 258
EOS_TOKEN_ID = 258
BOS_TOKEN_ID = 257
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
)


def make_tiny_qwen3(path: str | Path, **kwargs: Any) -> Path:
    """Qwen3: q/k norm, GQA 4/2 heads, head_dim 16 != hidden 48 / 4 heads, tied embeddings."""
    from transformers import Qwen3Config

    return _save(Qwen3Config, dict(hidden_size=48, head_dim=16, tie_word_embeddings=True), path, **kwargs)


def make_tiny_llama(path: str | Path, **kwargs: Any) -> Path:
    """Llama: GQA 4/2 heads, head_dim 16, untied embeddings."""
    from transformers import LlamaConfig

    return _save(LlamaConfig, dict(tie_word_embeddings=False), path, **kwargs)


def make_tiny_qwen2(path: str | Path, **kwargs: Any) -> Path:
    """Qwen2: q/k/v bias, GQA 4/2 heads, head_dim 16, untied embeddings."""
    from transformers import Qwen2Config

    return _save(Qwen2Config, dict(tie_word_embeddings=False), path, **kwargs)


def make_tiny_qwen3_moe(path: str | Path, *, fused_experts: bool = False, **kwargs: Any) -> Path:
    """Qwen3-MoE: 3 layers, 8 experts of width 32, top-2 renormalised; layer 1 dense (mlp_only_layers,
    width 96), layers 0 and 2 sparse; q/k norm, GQA 4/2 heads, head_dim 16, untied embeddings.

    Saved the way transformers saves by default (one tensor per expert and projection), or with
    fused_experts in its stacked layout (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]).
    """
    from transformers import Qwen3MoeConfig

    family = dict(
        hidden_size=48, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
        tie_word_embeddings=False,
    )
    if fused_experts:
        kwargs["save_original_format"] = False
    return _save(Qwen3MoeConfig, family, path, **kwargs)


def _save(
    config_cls: Any,
    family: dict[str, Any],
    path: str | Path,
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
    save_original_format: bool = True,
    **overrides: Any,
) -> Path:
    """Random model for config_cls saved to path. overrides go to the config (e.g. rope_scaling).
    save_original_format=False keeps transformers' in-memory layout (e.g. stacked MoE experts)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = config_cls(**{**_COMMON, **family, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    _perturb(model)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if not save_original_format:  # transformers 5 only; older versions always save their own layout
        save_kwargs["save_original_format"] = False
    model.save_pretrained(path, **save_kwargs)
    if with_tokenizer:
        make_tiny_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> None:
    # transformers initializes norms to 1 and biases to 0, which would hide a
    # norm or bias that is dropped or misplaced; make them random too, and
    # larger weights so logits are far from uniform.
    for name, param in model.named_parameters():
        if "norm" in name:
            param.normal_(1.0, 0.2)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.1)
        else:
            param.normal_(0.0, 0.08)


def make_tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer without merges: one token per byte, ids 0-255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_char, key=_byte_of))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def _byte_of(char: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def runner_batch(runner: Any, rows: list[int], starts: list[int], tokens: list[torch.Tensor],
                 logits_rows: torch.Tensor | None = None) -> Any:
    """A ForwardBatch of `tokens[i]` appended at `starts[i]` to table row `rows[i]` of a bare
    ModelRunner (fresh slots from its allocator, written to its table); logits of each
    sequence's last token unless `logits_rows` says otherwise."""
    from radixserve.model_runner.forward_batch import ForwardBatch

    slots = []
    for row, start, toks in zip(rows, starts, tokens):
        new = torch.tensor(runner.allocator.alloc(len(toks)))
        runner.req_to_token.write(row, start, new)
        slots.append(new)
    lens = [len(t) for t in tokens]
    return ForwardBatch(
        input_ids=torch.cat(tokens),
        positions=torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]),
        out_slots=torch.cat(slots), req_rows=rows, prefix_lens=starts, extend_lens=lens,
        logits_rows=torch.tensor(lens).cumsum(0) - 1 if logits_rows is None else logits_rows,
    )
