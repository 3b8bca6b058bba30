"""Our decoder against transformers on the same weights (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import TINY_VOCAB, make_tiny_llama, make_tiny_qwen2, make_tiny_qwen3
from transformers import AutoModelForCausalLM

from radixserve.model_runner.loader import load_model
from radixserve.model_runner.model_config import ModelConfig

ATOL = 1e-4
MAKERS = {"qwen3": make_tiny_qwen3, "llama": make_tiny_llama, "qwen2": make_tiny_qwen2}


def causal_attention(config: ModelConfig):
    """attn callback for ONE sequence holding all T tokens: causal SDPA, kv heads expanded."""
    group = config.num_heads // config.num_kv_heads

    def attn(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = k.repeat_interleave(group, dim=1)  # kv head j serves q heads j*group .. j*group+group-1
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=config.softmax_scale
        )
        return out.transpose(0, 1)

    return attn


def packed_attention(config: ModelConfig, seq_lens: list[int]):
    """attn callback for several sequences packed back to back: each attends only to itself."""
    single = causal_attention(config)

    def attn(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for n in seq_lens:
            outs.append(single(layer_id, q[start : start + n], k[start : start + n], v[start : start + n]))
            start += n
        return torch.cat(outs)

    return attn


def make_positions(n: int, scheme: str) -> torch.Tensor:
    """from0: 0..n-1; offset: 37..; gapped: 0..n/2-1 then 150.. (RoPE is relative: only a gap
    changes the distances between tokens, an offset checks the cache away from 0)."""
    if scheme == "from0":
        return torch.arange(n)
    if scheme == "offset":
        return torch.arange(n) + 37
    half = n // 2
    return torch.cat([torch.arange(half), torch.arange(n - half) + 150])


def our_logits(model, config: ModelConfig, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    positions = torch.arange(len(ids)) if positions is None else positions
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, causal_attention(config)))


def hf_logits(path_or_model, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    hf = path_or_model
    if isinstance(hf, Path):
        hf = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    positions = torch.arange(len(ids)) if positions is None else positions
    with torch.no_grad():
        return hf(ids[None], position_ids=positions[None]).logits[0].float()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: make(root / name, with_tokenizer=False) for name, make in MAKERS.items()}


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(MAKERS))
@pytest.mark.parametrize("scheme", ["from0", "offset", "gapped"])
def test_logits_match_transformers(tiny_dirs, family, scheme):
    model, config = load_model(tiny_dirs[family], "cpu", torch.float32, progress=False)
    ids = random_ids(24)
    positions = make_positions(24, scheme)
    ours = our_logits(model, config, ids, positions)
    ref = hf_logits(tiny_dirs[family], ids, positions)
    assert ours.dtype == torch.float32 and ours.shape == (24, TINY_VOCAB)
    assert (ours - ref).abs().max().item() < ATOL


def test_positions_drive_rope(tiny_dirs):
    # Guards the "gapped" parity case against a model that ignores positions.
    model, config = load_model(tiny_dirs["qwen3"], "cpu", torch.float32, progress=False)
    ids = random_ids(8)
    from0 = our_logits(model, config, ids, make_positions(8, "from0"))
    gapped = our_logits(model, config, ids, make_positions(8, "gapped"))
    assert (from0[4:] - gapped[4:]).abs().max().item() > 1e-3
    torch.testing.assert_close(from0[:4], gapped[:4], atol=1e-6, rtol=0)  # causal: the prefix is unchanged


ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "factor": 2.0},
    # dynamic NTK equals plain RoPE below max_position_embeddings: parity only.
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(tmp_path, kind):
    path = make_tiny_llama(tmp_path / kind, rope_scaling=dict(ROPE_SCALINGS[kind]), rope_theta=10000.0,
                           with_tokenizer=False)
    model, config = load_model(path, "cpu", torch.float32, progress=False)
    assert config.rope_type == kind
    inv_freq, scaling = config.rope_frequencies()
    plain = 1.0 / (10000.0 ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    if kind in ("llama3", "yarn", "linear"):
        assert not torch.allclose(inv_freq, plain)  # the case really scales
    if kind == "yarn":
        assert scaling != 1.0  # and exercises attention_scaling on cos/sin
    ids = random_ids(20, seed=1)
    positions = make_positions(20, "gapped")  # spans original_max_position_embeddings (64)
    ours = our_logits(model, config, ids, positions)
    ref = hf_logits(path, ids, positions)
    assert (ours - ref).abs().max().item() < ATOL


def test_packed_sequences_match_separate_runs(tiny_dirs):
    model, config = load_model(tiny_dirs["qwen3"], "cpu", torch.float32, progress=False)
    a, b = random_ids(7, seed=2), random_ids(5, seed=3)
    calls = []

    def recording(layer_id, q, k, v):
        calls.append((layer_id, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return packed_attention(config, [7, 5])(layer_id, q, k, v)

    ids = torch.cat([a, b])
    positions = torch.cat([torch.arange(7), torch.arange(5)])
    with torch.no_grad():
        packed = model(ids, positions, recording)
    d = config.head_dim
    assert calls == [(i, (12, 4, d), (12, 2, d), (12, 2, d)) for i in range(config.num_layers)]
    with torch.no_grad():
        alone_a = model(a, torch.arange(7), causal_attention(config))
        alone_b = model(b, torch.arange(5), causal_attention(config))
    torch.testing.assert_close(packed, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=0)


def test_inputs_embeds_replace_the_lookup(tiny_dirs):
    model, config = load_model(tiny_dirs["llama"], "cpu", torch.float32, progress=False)
    ids = random_ids(6)
    attn = causal_attention(config)
    with torch.no_grad():
        from_ids = model(ids, torch.arange(6), attn)
        from_embeds = model(ids, torch.arange(6), attn, inputs_embeds=model.embed(ids))
    torch.testing.assert_close(from_ids, from_embeds, atol=0, rtol=0)


def test_bf16_stays_close_to_fp32(tiny_dirs):
    model32, config = load_model(tiny_dirs["qwen3"], "cpu", torch.float32, progress=False)
    model16, _ = load_model(tiny_dirs["qwen3"], "cpu", torch.bfloat16, progress=False)
    assert model16.rotary.cos_sin_cache.dtype == torch.bfloat16
    ids = random_ids(16)
    ref = our_logits(model32, config, ids)
    low = our_logits(model16, config, ids)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_smollm2_logits_match_transformers(smollm_path):
    from transformers import AutoTokenizer

    path = smollm_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    model, config = load_model(path, "cpu", torch.float32, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for scheme in ("gapped", "from0"):
        positions = make_positions(len(ids), scheme)
        ours = our_logits(model, config, ids, positions)
        assert (ours - hf_logits(hf, ids, positions)).abs().max().item() < ATOL
    # The real model, not just matching numbers: it starts answering.
    assert tokenizer.decode(ours[-1].argmax().item()).strip() in {"The", "Paris"}
