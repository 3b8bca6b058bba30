"""Qwen3-MoE against transformers (fp32, CPU): routing, layer choice, both checkpoint layouts,
both expert implementations, the expert-work counter, and the whole engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import TINY_VOCAB, make_tiny_qwen3, make_tiny_qwen3_moe
from safetensors.torch import load_file, save_file
from test_models import causal_attention, hf_logits, make_positions, our_logits, packed_attention, random_ids
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from radixserve import SamplingParams
from radixserve.model_runner.loader import load_model
from radixserve.model_runner.model_config import ModelConfig
from radixserve.model_runner.models import build_model
from radixserve.model_runner.models.moe import (
    SparseMoeBlock,
    group_by_expert,
    grouped_mm_unavailable,
    resolve_moe_backend,
    route,
)

ATOL = 1e-4
CPU = torch.device("cpu")
# name -> (make_tiny_qwen3_moe overrides, the layers that must be sparse)
VARIANTS = {
    # decoder_sparse_step 1, layer 1 dense through mlp_only_layers, top-2 renormalised.
    "step1_norm": (dict(), (0, 2)),
    # decoder_sparse_step 2 makes layers 0 and 2 dense, mlp_only_layers layer 3; raw top-2 weights.
    "step2_raw": (dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=False),
                  (1,)),
    # transformers' stacked experts layout (save_original_format=False).
    "fused": (dict(fused_experts=True), (0, 2)),
}
HAS_GROUPED_MM = grouped_mm_unavailable(CPU, torch.float32, 48, 32) is None


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_moe")
    return {name: make_tiny_qwen3_moe(root / name, with_tokenizer=False, **kw) for name, (kw, _) in VARIANTS.items()}


@pytest.fixture(scope="module")
def moe_model(moe_dirs):
    return load_model(moe_dirs["step1_norm"], "cpu", torch.float32, progress=False)


def checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# -- parity with transformers --------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scheme", ["from0", "gapped"])
def test_logits_match_transformers(moe_dirs, variant, scheme):
    model, config = load_model(moe_dirs[variant], "cpu", torch.float32, progress=False)
    assert config.moe_layers == VARIANTS[variant][1]
    ids, positions = random_ids(24, seed=5), make_positions(24, scheme)
    ours = our_logits(model, config, ids, positions)
    ref = hf_logits(moe_dirs[variant], ids, positions)
    assert ours.shape == (24, TINY_VOCAB)
    assert (ours - ref).abs().max().item() < ATOL
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_routing_matters(moe_model):
    # Guards the parity test against a model in which the experts do not count.
    model, config = moe_model
    ids = random_ids(12, seed=6)
    before = our_logits(model, config, ids)
    block = model.layers[0].mlp
    saved = block.w_down[3].clone()
    with torch.no_grad():
        block.w_down[3].zero_()
    try:
        assert (our_logits(model, config, ids) - before).abs().max().item() > 1e-3
    finally:
        with torch.no_grad():
            block.w_down[3].copy_(saved)


def test_packed_sequences_match_separate_runs(moe_model):
    # Routing is per token: what else shares the batch changes nothing.
    model, config = moe_model
    a, b = random_ids(9, seed=7), random_ids(6, seed=8)
    with torch.no_grad():
        packed = model(torch.cat([a, b]), torch.cat([torch.arange(9), torch.arange(6)]),
                       packed_attention(config, [9, 6]))
        alone = [model(x, torch.arange(len(x)), causal_attention(config)) for x in (a, b)]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=0)


# -- which layers are sparse ---------------------------------------------------------------

LAYER_RULES = [
    dict(decoder_sparse_step=1, mlp_only_layers=[]),
    dict(decoder_sparse_step=2, mlp_only_layers=[]),
    dict(decoder_sparse_step=3, mlp_only_layers=[2]),
    dict(decoder_sparse_step=1, mlp_only_layers=[0, 4]),
    dict(decoder_sparse_step=2, mlp_only_layers=[1, 9]),  # 9: past the last layer, ignored as transformers does
    dict(decoder_sparse_step=1, mlp_only_layers=[], num_experts=0),  # no experts: every layer dense
]


@pytest.mark.parametrize("rule", LAYER_RULES, ids=str)
def test_sparse_layers_are_the_ones_transformers_builds(rule):
    hf_config = Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=16, head_dim=8, intermediate_size=32,
        moe_intermediate_size=8, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
        num_experts_per_tok=2, **{"num_experts": 4, **rule},
    )
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    hf_sparse = tuple(i for i, layer in enumerate(hf.model.layers)
                      if type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock")
    config = ModelConfig.from_hf_config(hf_config)
    assert config.moe_layers == hf_sparse
    ours = build_model(config, "cpu", torch.float32)
    assert tuple(i for i, layer in enumerate(ours.layers) if isinstance(layer.mlp, SparseMoeBlock)) == hf_sparse


@pytest.mark.parametrize(
    "field, value, match",
    [("num_experts_per_tok", 9, "num_experts_per_tok must be in"), ("decoder_sparse_step", 0, "decoder_sparse_step")],
)
def test_bad_moe_config_is_named(field, value, match):
    hf_config = Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], num_experts=8, num_hidden_layers=2)
    setattr(hf_config, field, value)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf_config)


# -- routing and grouping ------------------------------------------------------------------


def test_route_picks_the_top_k_and_renormalises():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [4.0, -1.0, 4.5, 0.0]])
    probs = torch.softmax(logits, dim=-1)
    raw = route(logits, 2, renormalize=False)
    assert raw.expert_ids.tolist() == [[1, 3], [2, 0]]
    torch.testing.assert_close(raw.weights, probs.gather(1, raw.expert_ids))
    assert (raw.weights.sum(-1) < 1).all()
    norm = route(logits, 2, renormalize=True)
    assert torch.equal(norm.expert_ids, raw.expert_ids)
    torch.testing.assert_close(norm.weights, raw.weights / raw.weights.sum(-1, keepdim=True))
    torch.testing.assert_close(norm.weights.sum(-1), torch.ones(2))


def test_route_softmax_is_float32_and_weights_come_back_in_the_logits_dtype():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    r = route(logits, 3, renormalize=True)
    assert r.weights.dtype == torch.bfloat16 and r.expert_ids.dtype == torch.int64
    probs = torch.softmax(logits.float(), dim=-1)
    top, _ = probs.topk(3, dim=-1)
    assert torch.equal(r.weights, (top / top.sum(-1, keepdim=True)).to(torch.bfloat16))


def test_group_by_expert_sorts_pairs_stably():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # pairs t*k+j: 0:2 1:0 2:2 3:1 4:0 5:2
    g = group_by_expert(ids, num_experts=4)
    assert g.order.tolist() == [1, 4, 3, 0, 2, 5]
    assert g.ends.tolist() == [2, 3, 6, 6] and g.ends.dtype == torch.int32
    assert g.counts.tolist() == [2, 1, 3, 0] == torch.bincount(ids.reshape(-1), minlength=4).tolist()


def random_block(renormalize: bool, seed: int = 0, dtype: torch.dtype = torch.float32) -> SparseMoeBlock:
    g = torch.Generator().manual_seed(seed)
    block = SparseMoeBlock(hidden_size=16, intermediate_size=8, num_experts=6, top_k=2, renormalize=renormalize,
                           dtype=dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return block


def naive_moe(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The definition, token by token."""
    probs = torch.softmax(block.gate(x).float(), dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, ids = probs[t].topk(block.top_k)
        if block.renormalize:
            w = w / w.sum()
        for weight, e in zip(w.tolist(), ids.tolist()):
            gate, up = (block.w_gate_up[e] @ x[t]).chunk(2)
            out[t] += weight * (block.w_down[e] @ (F.silu(gate) * up))
    return out


BACKENDS = ["loop"] + (["grouped_mm"] if HAS_GROUPED_MM else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_block_matches_the_definition(backend, renormalize):
    block = random_block(renormalize)
    block.backend = backend
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_moe(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_takes_an_empty_batch(backend):
    block = random_block(True)
    block.backend = backend
    with torch.no_grad():
        assert block(torch.empty(0, 16)).shape == (0, 16)


def test_block_counts_expert_work():
    block = random_block(True)
    block.expert_tokens.zero_()
    x = torch.randn(13, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        block(x)
        block(x[:4])
    ids = route(block.gate(x), 2, True).expert_ids
    expected = torch.bincount(ids.reshape(-1), minlength=6) + torch.bincount(ids[:4].reshape(-1), minlength=6)
    assert torch.equal(block.expert_tokens, expected) and block.expert_tokens.sum().item() == (13 + 4) * 2


# -- expert implementations ----------------------------------------------------------------


def test_backend_choice_and_errors():
    assert resolve_moe_backend("auto", CPU, torch.float32, 48, 32) == "loop"  # CPU: the exact loop
    assert resolve_moe_backend("loop", CPU, torch.float32, 6, 6) == "loop"
    with pytest.raises(ValueError, match="moe_backend must be one of auto, grouped_mm, loop"):
        resolve_moe_backend("triton", CPU, torch.float32, 48, 32)
    with pytest.raises(ValueError, match="grouped_mm' is unavailable: hidden_size 6 .*16-byte"):
        resolve_moe_backend("grouped_mm", CPU, torch.float32, 6, 32)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no grouped_mm for CPU")
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_grouped_mm_matches_the_loop(moe_dirs, dtype, atol):
    model, config = load_model(moe_dirs["step1_norm"], "cpu", dtype, progress=False, moe_backend="grouped_mm")
    assert model.moe_backend == "grouped_mm" and {b.backend for b in model.moe_blocks()} == {"grouped_mm"}
    ids = random_ids(20, seed=9)
    grouped = our_logits(model, config, ids)
    assert model.set_moe_backend("loop") == "loop"
    looped = our_logits(model, config, ids)
    assert (grouped - looped).abs().max().item() < atol


# -- loading both layouts ------------------------------------------------------------------


def test_per_expert_tensors_are_stacked(moe_dirs, moe_model):
    model, config = moe_model
    ckpt = checkpoint(moe_dirs["step1_norm"])
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in ckpt  # what transformers saves by default
    block = model.layers[2].mlp
    for e in range(config.num_experts):
        prefix = f"model.layers.2.mlp.experts.{e}"
        gate_up = torch.cat([ckpt[f"{prefix}.gate_proj.weight"], ckpt[f"{prefix}.up_proj.weight"]])
        assert torch.equal(block.w_gate_up[e], gate_up)
        assert torch.equal(block.w_down[e], ckpt[f"{prefix}.down_proj.weight"])
    assert torch.equal(block.gate.weight, ckpt["model.layers.2.mlp.gate.weight"])
    dense = model.layers[1].mlp
    assert torch.equal(dense.gate_up_proj.weight, torch.cat(
        [ckpt["model.layers.1.mlp.gate_proj.weight"], ckpt["model.layers.1.mlp.up_proj.weight"]]))


def test_stacked_layout_loads_the_same_weights(moe_dirs, moe_model):
    ckpt = checkpoint(moe_dirs["fused"])
    assert ckpt["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 48)
    assert not any(".experts.0." in name for name in ckpt)
    per_expert, _ = moe_model
    fused, _ = load_model(moe_dirs["fused"], "cpu", torch.float32, progress=False)  # same seed, same weights
    for (name, a), (_, b) in zip(per_expert.named_parameters(), fused.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_sharded_per_expert_checkpoint(tmp_path, moe_model):
    path = make_tiny_qwen3_moe(tmp_path / "sharded", max_shard_size="40KB", with_tokenizer=False)
    assert len(list(path.glob("*.safetensors"))) > 3
    sharded, _ = load_model(path, progress=False)
    for (name, a), (_, b) in zip(moe_model[0].named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_missing_expert_is_named(tmp_path, moe_dirs):
    path = tmp_path / "m"
    shutil.copytree(moe_dirs["step1_norm"], path)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.2.mlp.experts.3.up_proj.weight")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weight.*experts\.3\.up_proj"):
        load_model(path, progress=False)


# -- the expert-work counter ---------------------------------------------------------------


def test_moe_stats_count_routed_tokens(moe_dirs):
    model, config = load_model(moe_dirs["step1_norm"], "cpu", torch.float32, progress=False)
    empty = model.moe_stats()
    assert empty["routed_tokens"] == 0 and empty["moe_layers"] == 2 and empty["expert_tokens"] == [0] * 8
    our_logits(model, config, random_ids(10))
    our_logits(model, config, random_ids(3))
    stats = model.moe_stats()
    assert stats["moe_tokens"] == 2 * 13 and stats["routed_tokens"] == 2 * 13 * 2
    assert sum(stats["expert_tokens"]) == stats["routed_tokens"]
    model.reset_moe_stats()
    assert model.moe_stats()["routed_tokens"] == 0


def test_dense_models_report_no_expert_work(tmp_path):
    model, config = load_model(make_tiny_qwen3(tmp_path / "q", with_tokenizer=False), progress=False)
    our_logits(model, config, random_ids(5))
    assert model.moe_stats() == {"moe_layers": 0, "moe_tokens": 0, "routed_tokens": 0, "expert_tokens": []}


# -- the whole engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_engine_path(tmp_path_factory) -> Path:
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-moe-engine"))


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    prompt = torch.tensor([ids])
    with torch.no_grad():  # an explicit mask: generate would take token 0 (pad_token_id) for padding
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_engine_greedy_matches_transformers_with_the_prefix_cache(make_engine, moe_engine_path):
    engine = make_engine(moe_engine_path, max_running_requests=8)
    hf = AutoModelForCausalLM.from_pretrained(moe_engine_path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 256, (20,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9)] + [shared[:7]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = [hf_greedy(hf, ids, 10) for ids in prompts]
    model = engine.core.runner.model
    cold = engine.generate(prompts, params, progress=False)
    cold_work = model.moe_stats()["moe_tokens"]
    assert [o.token_ids for o in cold] == expected
    warm = engine.generate(prompts, params, progress=False)  # the prompts are in the radix tree now
    assert [o.token_ids for o in warm] == expected
    assert all(o.cached_tokens > 0 for o in warm)
    warm_work = model.moe_stats()["moe_tokens"] - cold_work
    assert 0 < warm_work < cold_work  # cached prefixes skip their expert work too


def test_fold_modes_equal_off_and_save_expert_work(make_engine, moe_engine_path):
    """Folding a shared prefix gives the outputs of `off` and routes fewer tokens to experts."""
    from radixserve import SamplingParams

    shared = list(range(30, 70))
    prompts = [shared + [5, 6], shared + [7], shared, shared + [8, 9, 10]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    results = {}
    for mode in ("off", "mlp", "tree"):
        engine = make_engine(moe_engine_path, fold_mode=mode, fold_threshold=1.0, enable_prefix_cache=False)
        model = engine.core.runner.model
        model.reset_moe_stats()
        outs = engine.generate(prompts, params, progress=False)
        routed = model.moe_stats()["routed_tokens"]
        results[mode] = ([o.token_ids for o in outs], [lp.logprob for o in outs for lp in o.logprobs], routed)
    for mode in ("mlp", "tree"):
        assert results[mode][0] == results["off"][0]
        assert max(abs(a - b) for a, b in zip(results[mode][1], results["off"][1])) < 1e-4
        assert results[mode][2] < results["off"][2]  # the shared prefix went through the experts once
