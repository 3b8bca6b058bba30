"""Structured output and the logit controls on CUDA: the mask and the offset give the CPU's draws
without a host sync, and SmolLM2 in bf16 with overlapped scheduling (CUDA graphs on) keeps every
JSON-schema output valid."""

from __future__ import annotations

import json

import pytest
import torch
import xgrammar as xg

from radixserve import SamplingParams
from radixserve.model_runner.forward_batch import SamplingRow
from radixserve.model_runner.sampler import SamplingBatch, TokenBitmask, sample
from radixserve.sampling_params import StructuredOutput

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

V = 1000


def test_cuda_mask_and_offset_match_cpu_without_a_sync():
    torch.manual_seed(3)
    logits = torch.randn(6, V) * 2
    params = [SamplingParams(temperature=t, logit_bias={5: 4.0, 7: -100}, allowed_token_ids=list(range(0, V, 3)))
              if i % 2 else SamplingParams(temperature=t) for i, t in enumerate([0.0, 0.7, 1.0, 1.3, 0.0, 0.9])]
    rows = [SamplingRow(p, [1], [], 10 + i, i) for i, p in enumerate(params)]
    bits = xg.allocate_token_bitmask(6, V)
    bits[1:4] = torch.randint(-(2**31), 2**31 - 1, (3, bits.shape[1]), dtype=torch.int32)
    cpu = sample(logits, SamplingBatch.build(rows, V, "cpu"), TokenBitmask(bits, [1, 2, 3]))
    gpu_logits = logits.cuda()
    gpu_bits = bits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(gpu_logits, SamplingBatch.build(rows, V, "cuda"), TokenBitmask(gpu_bits, [1, 2, 3]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.token_ids.cpu(), cpu.token_ids)


def test_json_schema_outputs_validate_with_overlap_and_graphs(smollm_path, make_engine):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    engine = make_engine(smollm_path, device="cuda", kv_cache_tokens=8192)
    assert engine.core.overlap
    prompt = engine.apply_chat_template([{"role": "user", "content": "A person as JSON with name and age."}])
    params = [SamplingParams(max_tokens=60, temperature=1, seed=s, n=4, structured=StructuredOutput(json=schema))
              for s in range(8)]
    plain = SamplingParams(max_tokens=30, temperature=0)
    outs = engine.generate([prompt] * 8 + [prompt], params + [plain], progress=False)
    for out in outs[:8]:
        for c in out.outputs:
            assert c.finish_reason == "stop", c
            obj = json.loads(c.text)
            assert set(obj) == {"name", "age"} and type(obj["age"]) is int and 0 <= obj["age"] <= 120, obj
    (alone,) = engine.generate([prompt], plain, progress=False)
    assert outs[8].token_ids == alone.token_ids
