"""Packed float32 linear layers on the CPU (models/cpu_linear.py): the same function as
F.linear to float32 rounding, decode-sized inputs through the packed weight, the model's
parameters untouched (names, tensors), and only float32 CPU models packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from radixserve.model_runner.models import cpu_linear
from radixserve.model_runner.models.cpu_linear import PACKED_MAX_ROWS, PackedLinear, pack_linears, packing_supported

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 32, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1])
def test_packed_linear_equals_f_linear(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 80, bias=bias)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        got, want = packed(x), F.linear(x, linear.weight, linear.bias)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


@needs_onednn
def test_small_inputs_take_the_packed_weight_and_large_ones_f_linear(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape[0])
            return real(*args)

    monkeypatch.setattr(cpu_linear.torch.ops.mkldnn, "_linear_pointwise", Spy(), raising=False)
    packed = PackedLinear.from_linear(nn.Linear(16, 8))
    with torch.inference_mode():
        packed(torch.randn(3, 16))
        packed(torch.randn(PACKED_MAX_ROWS + 1, 16))
        packed(torch.randn(0, 16))
    assert calls == [3]


@needs_onednn
def test_a_row_does_not_depend_on_the_rows_beside_it():
    """The packed path computes each row alike whatever the batch (MKL's one-row gemv does not)."""
    packed = PackedLinear.from_linear(nn.Linear(576, 300))
    x = torch.randn(64, 576)
    with torch.inference_mode():
        alone = torch.cat([packed(x[i : i + 1]) for i in range(8)])
        together = packed(x)[:8]
    assert torch.equal(alone, together)


@needs_onednn
def test_pack_linears_keeps_the_parameters_and_skips_subclasses():
    class RowLinear(nn.Linear):  # stands for the row-parallel layer: its own forward
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4, bias=False)), RowLinear(4, 4))
    before = dict(model.named_parameters())
    assert pack_linears(model) == 2
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert type(model[2]) is RowLinear


def test_only_float32_cpu_models_are_packed(tiny_qwen3_path, make_engine):
    assert not packing_supported(torch.device("cpu"), torch.bfloat16)
    assert not packing_supported(torch.device("meta"), torch.float32)
    engine = make_engine(tiny_qwen3_path)
    model = engine.core.runner.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if torch.backends.mkldnn.is_available():
        assert packed and model.logits_packed is not None
    else:
        assert not packed and model.logits_packed is None
