"""Packed quantized weights: int4 groups reproduce Q4_0/Q4_1 blocks exactly, int8 rows stay within
half a step of Q8_0 weights, the kernels multiply what the packing says, and a tied int8 output
matrix serves as the embedding. Blocks come from gguf-py's own quantizer (llama.cpp's reference)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmchat.engine.packed import (
    DEQUANTIZE_FROM_ROWS,
    INT4_GROUP,
    PackedLinear,
    PackingReport,
    int4_groups,
    layout_for,
)

OUT, IN = 96, 256


def _gguf_weights(qtype: Q, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """Random weights [OUT, IN] after a round trip through llama.cpp's quantizer for `qtype`."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((OUT, IN)) * 0.05 + shift).astype(np.float32)
    return torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)))


def _group_step(weights: torch.Tensor) -> torch.Tensor:
    """Each weight's block step d: the smallest gap between distinct values of its group of 32."""
    groups = weights.reshape(OUT, IN // INT4_GROUP, INT4_GROUP)
    spread = groups.amax(-1) - groups.amin(-1)
    return (spread / 15).repeat_interleave(INT4_GROUP, dim=1)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_0])
@pytest.mark.parametrize("shift", [0.0, 0.2])
def test_int4_reproduces_q4_blocks_code_for_code(qtype: Q, shift: float) -> None:
    """The fit is exact in float32: llama.cpp's blocks come back code for code. Through the kernel
    (scale, zero and output rounded to bfloat16) every weight stays well within half a step, so no
    code is off by one; a wrong group size, zero point or code order misses by whole steps."""
    weights = _gguf_weights(qtype, shift=shift)
    codes, scale, zero = int4_groups(weights)
    fitted = (codes.float() - 8) * scale.repeat_interleave(INT4_GROUP, 1) + zero.repeat_interleave(INT4_GROUP, 1)
    assert torch.equal(fitted, weights)
    packed = PackedLinear(weights, None, "int4")
    error = (packed.dequantized() - weights).abs()
    step = _group_step(weights)
    assert (error <= step / 8).all(), f"worst {(error / step).max().item():.3f} of a step"
    # The kernel's own packing holds the same codes: its product with the identity is the matrix
    # (up to its bfloat16 output rounding).
    through_kernel = packed(torch.eye(IN)[:64]).t()
    assert ((through_kernel - weights[:, :64]).abs() <= step[:, :64] / 4).all()
    assert packed.packed.dtype == torch.uint8 and packed.packed.numel() == OUT * IN // 2  # 4 bits a weight


def test_int4_picks_the_symmetric_fit_for_q4_0() -> None:
    """Q4_0 blocks rarely use code 15; only the symmetric fit (zero 0) reproduces them exactly."""
    weights = _gguf_weights(Q.Q4_0)
    _, _, zero = int4_groups(weights)
    assert (zero == 0).float().mean().item() > 0.5
    _, _, zero_q41 = int4_groups(_gguf_weights(Q.Q4_1, shift=0.2))
    assert (zero_q41 != 0).all()


def test_int8_rows_stay_within_half_a_step_of_q8_0() -> None:
    weights = _gguf_weights(Q.Q8_0, shift=0.01)
    packed = PackedLinear(weights, None, "int8")
    step = packed.scales.float()[:, None]  # the row's bfloat16 scale, at most 2^-7 above amax/127
    assert (step * 127 >= weights.abs().amax(-1, keepdim=True)).all()
    error = (packed.dequantized() - weights).abs()
    assert (error <= step / 2 * (1 + 1e-6)).all(), f"worst {(error / step).max().item():.3f} of a step"
    assert packed.codes.dtype == torch.int8


@pytest.mark.parametrize("layout", ["int4", "int8"])
def test_packed_linear_multiplies_its_weights(layout: str) -> None:
    """The kernel's product equals a float matmul over the dequantized matrix (bfloat16 input), plus bias."""
    weights = _gguf_weights(Q.Q4_1 if layout == "int4" else Q.Q8_0, seed=3)
    bias = torch.randn(OUT)
    layer = PackedLinear(weights, bias, layout)
    x = torch.randn(5, IN)
    expected = x.to(torch.bfloat16).float() @ layer.dequantized().t() + bias
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (5, OUT)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    exact = x @ weights.t() + bias
    assert (got - exact).abs().max().item() < 0.05 * exact.abs().max().item()
    # A prefill-sized input takes the float32 route over the dequantized matrix: same numbers,
    # without the bfloat16 rounding of the input.
    rows = torch.randn(DEQUANTIZE_FROM_ROWS, IN)
    torch.testing.assert_close(layer(rows), rows @ layer.dequantized().t() + bias)
    torch.testing.assert_close(layer(rows[:5]), layer(rows)[:5], rtol=2e-2, atol=2e-2)


def test_tied_int8_matrix_serves_token_rows() -> None:
    weights = _gguf_weights(Q.Q8_0, seed=5)
    layer = PackedLinear(weights, None, "int8")
    ids = torch.tensor([0, 7, 95, 7])
    torch.testing.assert_close(layer.columns(ids), layer.dequantized()[ids], rtol=1e-2, atol=1e-3)
    with pytest.raises(RuntimeError):
        PackedLinear(weights, None, "int4").columns(ids)


def test_layouts_by_source_type() -> None:
    assert layout_for({"Q4_1"}) == "int4"
    assert layout_for({"Q4_K", "Q3_K"}) == "int4"
    assert layout_for({"Q4_K", "Q6_K"}) == "int8"  # a fused matrix takes the wider layout
    assert layout_for({"Q8_0"}) == "int8"
    assert layout_for({"Q4_0"}, needs_rows=True) == "int8"  # a tied embedding reads rows
    assert layout_for({"F16"}) is None and layout_for(set()) is None
    assert layout_for({"Q4_1", "F32"}) is None  # part float: keep it float
    report = PackingReport()
    report.add({"Q4_1"}, "int4")
    report.add({"Q4_1"}, "int4")
    report.add({"Q8_0"}, "int8")
    report.add({"Q4_K"}, "int4")
    assert report.summary() == (
        "Q4_1 → int4 (groups of 32) ×2, Q4_K → int4 (groups of 32), requantized ×1, "
        "Q8_0 → int8 (a scale per row), requantized ×1"
    )
