"""llmchat's int4 x int8 decode kernel (q4kernel.c) computes what its docstring says: the activations
quantized per group of 32 to int8, integer dot products with the int4 codes, the group scales applied
in float32 — checked against that arithmetic emulated in float64, against the dequantized product,
on both builds (AVX-512 VNNI and AVX2) where the CPU has them, and the fallback when it cannot build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmchat.engine import q4kernel
from llmchat.engine.packed import INT4_GROUP, PackedExperts, PackedLinear

VARIANTS = [name for name in ("avx512-vnni", "avx2") if name == "avx2" or q4kernel.cpu_variant() == "avx512-vnni"]


def _kernel(name: str) -> q4kernel.Int4Kernel:
    if q4kernel.cpu_variant() is None:
        pytest.skip("llmchat's int4 kernel does not apply to this CPU")
    kernel = q4kernel._load(name)
    if kernel is None:
        pytest.skip(f"the {name} build failed here: {q4kernel._failures.get(name)}")
    return kernel


def _emulated(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """The kernel's arithmetic in float64 from its definition: q = round(x / d), d = max|x| / 127 per group."""
    rows, inner = x.shape
    groups = x.float().view(rows, inner // INT4_GROUP, INT4_GROUP)
    d = groups.abs().amax(-1) / 127  # float32, as the kernel
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = (groups * inverse[..., None]).round()  # half to even, as lrintf
    nibbles = layer.nibbles
    codes = torch.stack((nibbles & 15, nibbles >> 4), dim=-1).view(layer.out_features, -1, INT4_GROUP).double()
    scale = layer.scale_zero[..., 0].t().double()  # [out, groups]
    zero = layer.scale_zero[..., 1].t().double()
    dots = torch.einsum("mgi,ngi->mng", q.double(), codes)  # exact integers
    sums = q.double().sum(-1)  # [rows, groups]
    d64 = d.double()
    y = (dots * scale * d64[:, None, :]).sum(-1) + ((zero - 8 * scale)[None] * (d64 * sums)[:, None, :]).sum(-1)
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("out", "inner", "rows", "source", "bias"),
    [
        (64, 256, 1, "Q4_0", False),  # 8 groups: the wide loop only
        (48, 96, 3, "Q4_1", True),  # 3 groups: an odd count takes the one-group tail; zeros and a bias
        (32, 1056, 2, "Q4_0", False),  # 33 groups: both loops and the scalar tail of the scale pass
        (16, 32, 5, "Q4_1", False),  # one group
    ],
)
def test_kernel_is_its_arithmetic(variant: str, out: int, inner: int, rows: int, source: str, bias: bool) -> None:
    generator = torch.Generator().manual_seed(out + inner)
    weight = torch.randn(out, inner, generator=generator) * 0.05 + (0.02 if source == "Q4_1" else 0.0)
    layer = PackedLinear(weight, torch.randn(out, generator=generator) if bias else None, "int4", [source])
    x = torch.randn(rows, inner, generator=generator)
    x[0, :INT4_GROUP] = 0  # a group of zeros: d = 0 must give 0, not NaN
    kernel = _kernel(variant)
    got = kernel.mm(x, layer.nibbles, *layer._row_scales(), layer.bias)
    expected = _emulated(x, layer)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    reference = x.double() @ layer.dequantized().double().t() + (0 if layer.bias is None else layer.bias.double())
    relative = (got.double() - reference).norm() / reference.norm()
    assert relative < 0.01  # int8 activations: what llama.cpp's Q8_0 activations cost


def test_zeros_are_skipped_only_when_all_are_zero() -> None:
    symmetric = PackedLinear(torch.randn(32, 64), None, "int4", ["Q4_0"])
    asymmetric = PackedLinear(torch.randn(32, 64) + 0.5, None, "int4", ["Q4_1"])
    assert symmetric._row_scales()[1] is None
    assert asymmetric._row_scales()[1] is not None


@pytest.mark.parametrize("variant", VARIANTS)
def test_experts_call_is_each_experts_product(variant: str) -> None:
    kernel = _kernel(variant)
    stack = torch.randn(5, 48, 128, generator=torch.Generator().manual_seed(3))
    experts = PackedExperts.pack(stack, "int4", frozenset({"Q4_1"}))
    scales, zeros = experts._row_scales()
    ids = torch.tensor([4, 0, 4, 2])
    shared = torch.randn(1, 128)
    own = torch.randn(4, 128)
    for x in (shared, own):
        got = kernel.experts(x, experts.experts.nibbles, scales, zeros, ids)
        for i, index in enumerate(ids.tolist()):
            layer = experts[index]
            row = x[:1] if x.shape[0] == 1 else x[i : i + 1]
            assert torch.equal(got[i : i + 1], kernel.mm(row, layer.nibbles, *layer._row_scales(), None))
    with pytest.raises(ValueError, match="input rows"):
        kernel.experts(torch.randn(2, 128), experts.experts.nibbles, scales, zeros, ids)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("rows", "inner"), [(1, 576), (3, 584), (40, 77)])
def test_int8_product_is_float32_over_the_codes(variant: str, rows: int, inner: int) -> None:
    """The output projection's product: int8 codes times float32 activations, then the row scale and
    bias, in float32 throughout — within float32 rounding of the float64 product (any width: a tail
    past the vector width included), and never bfloat16-coarse."""
    kernel = _kernel(variant)
    generator = torch.Generator().manual_seed(rows + inner)
    out = 37
    codes = torch.randint(-127, 128, (out, inner), dtype=torch.int8, generator=generator)
    scales = torch.rand(out, generator=generator) * 0.02
    bias = torch.randn(out, generator=generator)
    x = torch.randn(rows, inner, generator=generator)
    got = kernel.int8_mm(x, codes, scales, bias)
    reference = (x.double() @ codes.double().t()) * scales.double() + bias.double()
    scale_of = (x.double().abs() @ codes.double().abs().t()) * scales.double() + bias.double().abs()
    assert ((got.double() - reference).abs() <= 1e-6 * scale_of + 1e-6).all()
    assert (got != got.bfloat16().float()).float().mean() > 0.9


def test_builds_agree() -> None:
    """Both builds compute the same integer dots; only the float sums' order differs."""
    if len(VARIANTS) < 2:
        pytest.skip("this CPU has no AVX-512 VNNI")
    generator = torch.Generator().manual_seed(11)
    layer = PackedLinear(torch.randn(64, 512, generator=generator), None, "int4", ["Q4_1"])
    x = torch.randn(2, 512, generator=generator)
    a, b = (_kernel(name).mm(x, layer.nibbles, *layer._row_scales(), None) for name in VARIANTS)
    # float32 sums of 512 terms near 1 in two orders: ~1e-5 apart; a wrong dot misses by whole units
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_torch_capability_picks_the_build() -> None:
    """ATEN_CPU_CAPABILITY=avx2, which makes torch use its AVX2 kernels, selects the AVX2 build too."""
    if q4kernel.cpu_variant() is None:
        pytest.skip("llmchat's int4 kernel does not apply to this CPU")
    code = "from llmchat.engine import q4kernel; print(q4kernel.cpu_variant())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "avx2"


def test_without_a_compiler_the_layers_use_pytorchs_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if q4kernel.cpu_variant() is None:
        pytest.skip("llmchat's int4 kernel does not apply to this CPU")
    monkeypatch.setenv(q4kernel.ENV_SWITCH, "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(q4kernel, "_library_path", lambda name, flags: tmp_path / "nowhere.so")
    with pytest.raises(q4kernel.KernelBuildError):  # the real build step fails, with a reason
        q4kernel._build(tmp_path / "nowhere.so", [])
    q4kernel._load.cache_clear()
    q4kernel.available.cache_clear()
    try:
        assert q4kernel.available() is None
        assert "did not build" in q4kernel.describe()
        generator = torch.Generator().manual_seed(5)
        layer = PackedLinear(torch.randn(32, 64, generator=generator), None, "int4", ["Q4_0"])
        x = torch.randn(1, 64, generator=generator)
        reference = x @ layer.dequantized().t()
        assert ((layer(x) - reference).norm() / reference.norm()).item() < 0.01  # bfloat16 activations
    finally:
        q4kernel._load.cache_clear()
        q4kernel.available.cache_clear()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "length"), [(9, 3, 64, 300), (4, 4, 72, 65), (8, 2, 40, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_is_softmax_attention(
    variant: str, heads: int, kv_heads: int, head_dim: int, length: int, masked: bool
) -> None:
    """A decode step's attention over views of a larger cache (rows of D contiguous, heads a capacity
    apart), grouped query heads, a sliding window's mask: the float64 softmax attention within float32
    rounding, for head sizes with and without a tail past the vector width."""
    kernel = _kernel(variant)
    generator = torch.Generator().manual_seed(heads * length + masked)
    capacity = length + 37
    keys, values = (torch.randn(kv_heads, capacity, head_dim, generator=generator)[:, :length] for _ in range(2))
    q = (torch.randn(heads, 3, head_dim, generator=generator) * 2)[:, 1:2]  # a chunk's row: not contiguous
    mask = (torch.arange(length) >= length // 3)[None] if masked else None
    got = kernel.attention(q, keys, values, mask, 0.3)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q[None].double(), keys[None].double(), values[None].double(), attn_mask=mask, scale=0.3, enable_gqa=True
    )[0]
    assert got.shape == (heads, 1, head_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6)
