"""Packed quantized weights: int4 groups reproduce Q4_0/Q4_1 blocks exactly, int8 rows stay within
half a step of Q8_0 weights, the kernels multiply what the packing says, and the output projection
gives float32 logits from product matrices alone. Blocks come from gguf-py's own quantizer
(llama.cpp's reference)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmchat.engine import packed as packed_module
from llmchat.engine import q4kernel
from llmchat.engine.memory import module_bytes
from llmchat.engine.packed import (
    DEQUANTIZE_FROM_ROWS,
    FP16_K_BLOCK,
    INT4_GROUP,
    OUTPUT_LAYOUT,
    OUTPUT_ROW_BLOCK,
    PackedExperts,
    PackedLinear,
    PackingReport,
    int4_groups,
    int8_rows,
    layout_for,
    packed_bytes,
)

OUT, IN = 96, 256
pytestmark = pytest.mark.usefixtures("int4_kernel")  # every test with llmchat's int4 kernel and with PyTorch's


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
    assert packed.nibbles.dtype == torch.uint8 and packed.nibbles.numel() == OUT * IN // 2  # 4 bits a weight


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_0])
def test_an_int4_layer_holds_only_its_own_kernel_s_copies_and_the_bill_counts_them(qtype: Q, int4_kernel: str) -> None:
    """After `prepare_kernels` an int4 layer holds its nibbles, its (scale, zero) pairs and the copies of the
    kernel that multiplies it, not the other kernel's (PyTorch's packing is half a byte a weight; ours,
    row-major scales, with zeros unless they are all 0 as Q4_0's), and packed_bytes is what it holds."""
    layer = PackedLinear(_gguf_weights(qtype), None, "int4", [qtype.name])
    packed_module.prepare_kernels(layer)
    layer(torch.randn(1, IN))
    ours = int4_kernel == "llmchat"
    assert ("_rows" in layer.__dict__, "_aten" in layer.__dict__) == (ours, not ours)
    assert module_bytes(layer) == packed_bytes("int4", OUT, IN, [qtype.name])
    groups = OUT * IN // INT4_GROUP
    copies = (2 if qtype == Q.Q4_0 else 4) * groups if ours else OUT * IN // 2
    assert module_bytes(layer) == OUT * IN // 2 + 4 * groups + copies


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
def test_packed_experts_are_the_packed_layers_of_their_matrices(layout: str) -> None:
    """A stack of packed experts holds, multiplies and dequantizes each expert exactly as a PackedLinear
    of that expert's matrix does, and its bytes are theirs (no copy kept besides)."""
    stack = torch.randn(4, OUT, IN, generator=torch.Generator().manual_seed(7))
    experts = PackedExperts.pack(stack, layout, frozenset({"Q4_0" if layout == "int4" else "Q8_0"}))
    layers = [PackedLinear(matrix, None, layout, experts.sources) for matrix in stack]
    for module in [experts, *layers]:
        packed_module.prepare_kernels(module)
    assert len(experts) == 4 and module_bytes(experts) == sum(module_bytes(layer) for layer in layers)
    assert module_bytes(experts) == 4 * packed_bytes(layout, OUT, IN, experts.sources)
    x = torch.randn(3, IN)
    order = [2, 0, 3, 2]
    shared = experts.rows(x[:1], order)  # one input for all k experts (a decode step's gate/up)
    own_inputs = torch.randn(len(order), IN)
    own = experts.rows(own_inputs, order)  # each expert its own input (the down projections)
    for i, index in enumerate(order):
        assert torch.equal(shared[i : i + 1], layers[index](x[:1]))
        assert torch.equal(own[i : i + 1], layers[index](own_inputs[i : i + 1]))
        assert torch.equal(experts.matmul(x, index), layers[index](x))
        assert torch.equal(experts[index].dequantized(), layers[index].dequantized())
    rows = torch.randn(DEQUANTIZE_FROM_ROWS, IN)
    assert torch.equal(experts.matmul(rows, 1), layers[1](rows))


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
    # A prefill-sized input takes one GEMM over the dequantized matrix: in float32 (the same numbers,
    # without the input's rounding), or in bfloat16 where llmchat's kernel dequantizes and the CPU
    # multiplies bfloat16 natively (q4kernel.prefill_dtype).
    rows = torch.randn(DEQUANTIZE_FROM_ROWS, IN)
    gemm = q4kernel.prefill_dtype() if layout == "int4" and q4kernel.available() else torch.float32
    reference = (rows.to(gemm) @ layer.dequantized().to(gemm).t()).float() + bias
    torch.testing.assert_close(
        layer(rows), reference, **({} if gemm == torch.float32 else {"rtol": 1e-2, "atol": 1e-2})
    )
    torch.testing.assert_close(layer(rows[:5]), layer(rows)[:5], rtol=2e-2, atol=2e-2)


def test_layouts_by_source_type() -> None:
    assert layout_for({"Q4_1"}) == "int4"
    assert layout_for({"Q4_K", "Q3_K"}) == "int4"
    assert layout_for({"Q4_K", "Q6_K"}) == "int8"  # a fused matrix takes the wider layout
    assert layout_for({"Q8_0"}) == "int8"
    assert layout_for({"Q4_0"}, output=True) == OUTPUT_LAYOUT  # the output projection: float32 logits
    assert layout_for({"Q8_0"}, output=True) == OUTPUT_LAYOUT
    assert layout_for({"F16"}, output=True) is None
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


# --- the output projection: float32 logits ----------------------------------------------------------

# Inner sizes that exercise each form of the product: all columns in FBGEMM's fp16 matrix (512), a
# short tail as float32 columns (576 = 512 + 64, the demo's), a long tail padded into fp16 (960),
# and a matrix too narrow for FBGEMM to pay (64: float32 only).
OUTPUT_SHAPES = [(96, 512), (80, 576), (48, 960), (40, 64)]


def _output_weights(out: int, inner: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inner, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize(("out", "inner"), OUTPUT_SHAPES)
@pytest.mark.parametrize("rows", [1, 7, DEQUANTIZE_FROM_ROWS + 3])
def test_output_projection_is_the_float32_product_of_its_codes(out: int, inner: int, rows: int) -> None:
    """Logits are float32 over the packed weights (codes x float32 row scales) for any number of
    rows, within 1e-4 of float64 over the same weights — not bfloat16: the int8 kernel's output
    made every logit near 25 a multiple of 0.125, so candidates tied."""
    weights = _output_weights(out, inner)
    layer = PackedLinear(weights, None, OUTPUT_LAYOUT, ("Q8_0",))
    x = torch.randn(rows, inner, generator=torch.Generator().manual_seed(1)) * 4
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    reference = (x.double() @ layer.dequantized().double().t()).float()
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert (got != got.bfloat16().float()).float().mean() > 0.9, "the logits are bfloat16 values"
    assert layer.scales.dtype == torch.float32
    # the packed weights are the checkpoint's within half a step of each row's scale
    step = layer.scales[:, None]
    assert ((layer.dequantized() - weights).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize(("out", "inner"), OUTPUT_SHAPES)
def test_output_projection_forms_and_their_bytes(out: int, inner: int, int4_kernel: str) -> None:
    """Where the columns go, and that the bill (packed_bytes) is what the layer holds: with llmchat's
    kernel the int8 codes alone (one byte a weight); with PyTorch's, FBGEMM's padded matrices and no
    int8 codes beside them (a tied model's embedding reads the GGUF file, see test_gguf.py)."""
    weights = _output_weights(out, inner, seed=2)
    layer = PackedLinear(weights, None, OUTPUT_LAYOUT)
    if int4_kernel == "llmchat":
        assert layer.codes.dtype == torch.int8 and not layer._fp16 and "rest" not in dict(layer.named_buffers())
        assert module_bytes(layer) == packed_bytes(OUTPUT_LAYOUT, out, inner) == out * inner + 4 * out
        return
    tail = inner % FP16_K_BLOCK
    expected_split = {512: 512, 576: 512, 960: 960, 64: 0}[inner]
    assert layer.split == expected_split, tail
    assert "codes" not in dict(layer.named_buffers())
    assert all(buffer.dtype != torch.int8 for buffer in layer.buffers())
    assert module_bytes(layer) == packed_bytes(OUTPUT_LAYOUT, out, inner)


def test_output_projection_round_trips_through_its_saved_tensors() -> None:
    """The packed cache stores tensors only: codes and scales (an untied layer gives its codes back
    from its matrices, block by block), and a layer rebuilt from them computes the same logits."""
    out, inner = 2 * OUTPUT_ROW_BLOCK + 8, 576  # three FBGEMM row blocks, and a float32 tail
    weights = _output_weights(out, inner, seed=4)
    x = torch.randn(3, inner)
    layer = PackedLinear(weights, torch.randn(out), OUTPUT_LAYOUT, ("Q6_K",))
    state = layer.state_dict()
    assert sorted(state) == ["bias", "codes", "scales"]
    assert state["codes"].dtype == torch.int8 and state["scales"].dtype == torch.float32
    assert len(layer._fp16) == (0 if q4kernel.available() else 3)
    codes, _ = int8_rows(weights, torch.float32)
    assert torch.equal(state["codes"], codes)  # given back exactly from the fp16 and float32 matrices
    rebuilt = PackedLinear.from_buffers(OUTPUT_LAYOUT, ("Q6_K",), dict(state))
    assert torch.equal(rebuilt(x), layer(x))
    assert torch.equal(rebuilt.state_dict()["codes"], state["codes"])
    with pytest.raises(ValueError):  # bfloat16 scales are the int8 layout's, not this one's
        PackedLinear.from_buffers(OUTPUT_LAYOUT, (), {"codes": state["codes"], "scales": state["scales"].bfloat16()})


def test_output_projection_without_fbgemm_is_a_float32_matrix(
    monkeypatch: pytest.MonkeyPatch, int4_kernel: str
) -> None:
    """A torch build without FBGEMM (ARM, so without llmchat's kernel) keeps the whole matrix as float32
    codes: same logits, and the bill says so."""
    if int4_kernel == "llmchat":
        pytest.skip("llmchat's kernel multiplies the int8 codes; FBGEMM's matrices are not made")
    weights = _output_weights(80, 576, seed=6)
    x = torch.randn(2, 576)
    with_fbgemm = PackedLinear(weights, None, OUTPUT_LAYOUT)(x)
    monkeypatch.setattr(packed_module, "fp16_gemm_engine", lambda: None)
    layer = PackedLinear(weights, None, OUTPUT_LAYOUT)
    assert layer.split == 0 and not layer._fp16 and layer.opaque_bytes == 0
    torch.testing.assert_close(layer(x), with_fbgemm, rtol=1e-5, atol=1e-4)
    assert module_bytes(layer) == packed_bytes(OUTPUT_LAYOUT, 80, 576) == 80 * 576 * 4 + 80 * 4


def test_output_projection_prepacks_under_fbgemm_whatever_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepacking reads torch's global quantized engine; under one without an fp16 GEMM (qnnpack)
    the layer packs with FBGEMM's and puts the user's setting back."""
    engines = torch.backends.quantized.supported_engines
    if "qnnpack" not in engines or packed_module.fp16_gemm_engine() is None or q4kernel.available():
        pytest.skip("needs both qnnpack and FBGEMM in this torch build, and PyTorch's kernels")
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        layer = PackedLinear(_output_weights(32, 512), None, OUTPUT_LAYOUT)
        assert torch.backends.quantized.engine == "qnnpack"
    finally:
        torch.backends.quantized.engine = previous
    assert layer.split == 512 and layer._fp16
