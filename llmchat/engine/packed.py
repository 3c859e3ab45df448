"""Quantized weights kept packed on CPU and multiplied by PyTorch's quantized matmul kernels.

Why: decoding is bound by the bytes it reads per token. A GGUF's 4-bit matrices dequantized to
float32 are 8x larger than in the file; kept packed, every token reads a fraction of that. The
kernels take bfloat16 activations (the float32 variants are ~10x slower on CPU), so a packed
layer rounds its input to bfloat16 and returns float32; everything between the matmuls (norms,
RoPE, attention, the KV cache, the logits' softmax) stays in the model's float32.

Two layouts, both PyTorch's:
  int4  one code 0..15 per weight; each group of INT4_GROUP consecutive input columns of an output
        row shares a (scale, zero): w = (q - 8) * scale + zero. `_convert_weight_to_int4pack_for_cpu`
        packs the codes, `_weight_int4pack_mm_for_cpu` multiplies. The codes are also kept as
        plain nibbles (half a byte more per weight; the kernel's tiling is opaque) so that a
        prefill chunk can dequantize the matrix and run one float32 matmul, which is faster there.
  int8  one code -127..127 per weight and one scale per output row: w = q * scale.
        `_weight_int8pack_mm` multiplies.

Which GGUF type goes where (`layout_for`): types of 4 bits or fewer per weight become int4 with
groups of 32. For Q4_1 (w = d*q + m) that is exact up to rounding d and m + 8d to bfloat16:
llama.cpp's quantizer gives each block's minimum code 0 and its maximum code 15, so the block's
min/max recover m and d. Q4_0 (w = d*(q - 8)) is exact the same way through its symmetric form (the
largest-magnitude weight has code 0). K-quants (Q2_K, Q3_K, Q4_K) are requantized per group of 32.
Types of 5 to 8 bits (Q5_*, Q6_K, Q8_0) become int8 with a scale per row (requantized: 4-bit groups
would lose their precision). Float tensors stay float. `llmchat info` reports the mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP = 32
ACTIVATION_DTYPE = torch.bfloat16
# From this many rows (a prefill chunk) a float32 matmul over the matrix dequantized for the call
# beats the packed kernels, which are built for the few rows of decoding (AVX2, 3072x576 matrix:
# 512 rows 25 ms packed vs 15 ms dequantize + sgemm; 64 rows 2.9 ms vs 4.9 ms).
DEQUANTIZE_FROM_ROWS = 128
INT4_SOURCES = frozenset({"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"})
INT8_SOURCES = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"})
EXACT_INT4_SOURCES = frozenset({"Q4_0", "Q4_1"})  # their blocks are int4 groups of 32 already


def layout_for(source_types: Iterable[str], *, needs_rows: bool = False) -> str | None:
    """The packed layout for a matrix made of tensors of these GGUF types; None keeps it float.

    A fused matrix (q/k/v, gate/up) takes the wider layout any of its parts needs. `needs_rows`:
    the matrix also serves as the token embedding (tied), which reads single rows; only int8's
    per-row layout allows that.
    """
    types = set(source_types)
    if not types or not types <= INT4_SOURCES | INT8_SOURCES:
        return None
    if needs_rows or types & INT8_SOURCES:
        return "int8"
    return "int4"


def fits_int4(out_features: int, in_features: int) -> bool:
    """The int4 kernel tiles 16 output rows and groups of INT4_GROUP inputs."""
    return out_features % 16 == 0 and in_features % INT4_GROUP == 0


def packed_bytes(layout: str, out_features: int, in_features: int) -> int:
    """Bytes a PackedLinear holds for a matrix of this shape (bias aside)."""
    weights = out_features * in_features
    if layout == "int8":
        return weights + 2 * out_features  # codes, a bfloat16 scale per row
    kernel_packing = nibbles = weights // 2
    return kernel_packing + nibbles + out_features * (in_features // INT4_GROUP) * 4  # + bf16 (scale, zero)


def int4_groups(
    weight: torch.Tensor, group: int = INT4_GROUP, *, fit: str = "best"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [out, in] (int32, 0..15), scale and zero [out, in/group] (float32) for `weight` [out, in].

    Two fits: "asymmetric" min/max (scale = (max - min)/15, code 0 at the min) reproduces Q4_1
    blocks exactly; "symmetric" around code 8 with the largest-magnitude weight at code 0 (zero 0)
    reproduces Q4_0 blocks. "best" takes, per group, whichever misses its weights by less.
    """
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group, group)
    fits = []
    if fit in ("asymmetric", "best"):
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale_a = (high - low) / 15
        codes_a = ((w - low) / torch.where(scale_a == 0, 1.0, scale_a)).round().clamp(0, 15)
        fits.append((codes_a, scale_a, low + 8 * scale_a))
    if fit in ("symmetric", "best"):
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True))
        scale_b = extreme / -8
        codes_b = (w / torch.where(scale_b == 0, 1.0, scale_b) + 8).round().clamp(0, 15)
        fits.append((codes_b, scale_b, torch.zeros_like(scale_b)))
    if not fits:
        raise ValueError(f"unknown int4 fit {fit!r}")
    codes, scale, zero = fits[0]
    if len(fits) == 2:
        errors = [((c - 8) * s + z - w).abs().amax(-1, keepdim=True) for c, s, z in fits]
        symmetric = errors[1] < errors[0]
        codes, scale, zero = (torch.where(symmetric, b, a) for a, b in zip(fits[0], fits[1], strict=True))
    return codes.to(torch.int32).reshape(out_features, in_features), scale.squeeze(-1), zero.squeeze(-1)


def _int4_fit(sources: tuple[str, ...]) -> str:
    """The fit that reproduces these source types (both tried when they are mixed or unknown)."""
    if sources == ("Q4_0",):
        return "symmetric"
    if sources and "Q4_0" not in sources:
        return "asymmetric"  # Q4_1 exactly; K-quants' sub-blocks are min/max fits too
    return "best"


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [out, in] (int8, -127..127) and one scale per output row for `weight` [out, in].

    The scale is the kernel's bfloat16, rounded up (never clipping the largest weight), and the
    codes are taken against that rounded scale: every weight within half a step.
    """
    w = weight.float()
    exact = w.abs().amax(-1) / 127
    scale = exact.to(ACTIVATION_DTYPE)
    scale = torch.where(scale.float() < exact, (scale.float() * (1 + 2**-7)).to(ACTIVATION_DTYPE), scale)
    divisor = torch.where(scale == 0, 1.0, scale.float())
    codes = (w / divisor[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


ROW_BLOCK = 4096  # rows quantized at a time: bounds the float temporaries of a large matrix


RowQuantizer = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _by_rows(quantize: RowQuantizer, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`quantize` over blocks of rows, results concatenated (row-wise functions only)."""
    if weight.shape[0] <= ROW_BLOCK:
        return quantize(weight)
    blocks = [quantize(weight[i : i + ROW_BLOCK]) for i in range(0, weight.shape[0], ROW_BLOCK)]
    return tuple(torch.cat(parts) for parts in zip(*blocks, strict=True))


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed as int4 groups or int8 rows (see the module docstring)."""

    # buffers of the int4 layout
    packed: torch.Tensor
    nibbles: torch.Tensor
    scale_zero: torch.Tensor
    # buffers of the int8 layout
    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str, sources: Iterable[str] = ()
    ) -> None:
        """`weight` [out, in] in float; it is packed here and not kept. `bias` is kept in float32.

        `sources` (the checkpoint's types) is kept for the report.
        """
        super().__init__()
        weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape
        if layout == "int4" and not fits_int4(self.out_features, self.in_features):
            raise ValueError(f"a {self.out_features}x{self.in_features} matrix does not fit the int4 kernel")
        self.layout = layout
        self.sources = tuple(sorted(set(sources)))
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        if layout == "int4":
            fit = _int4_fit(self.sources)
            codes, scale, zero = _by_rows(lambda rows: int4_groups(rows, fit=fit), weight)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)  # even column low
            self.register_buffer("nibbles", nibbles)
            # [in/group, out, 2]: the kernel's layout of the groups' (scale, zero)
            scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(ACTIVATION_DTYPE).contiguous()
            self.register_buffer("scale_zero", scale_zero)
        elif layout == "int8":
            codes8, scale8 = _by_rows(int8_rows, weight)
            self.register_buffer("codes", codes8)
            self.register_buffer("scales", scale8)
        else:
            raise ValueError(f"unknown packed layout {layout!r}")

    @classmethod
    def from_buffers(cls, layout: str, sources: Iterable[str], buffers: dict[str, torch.Tensor]) -> PackedLinear:
        """A layer from the buffers (and bias) a packed one saved (see packed_cache.py)."""
        names = {"int4": ("packed", "nibbles", "scale_zero"), "int8": ("codes", "scales")}[layout]
        if set(buffers) - {"bias"} != set(names):
            raise ValueError(f"a {layout} layer needs {names}, got {sorted(buffers)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        out_features, row_bytes = buffers["nibbles" if layout == "int4" else "codes"].shape
        layer.layout, layer.out_features = layout, out_features
        layer.in_features = 2 * row_bytes if layout == "int4" else row_bytes
        layer.sources = tuple(sources)
        bias = buffers.get("bias")
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        for name in names:
            layer.register_buffer(name, buffers[name])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DEQUANTIZE_FROM_ROWS:
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        low = x.to(ACTIVATION_DTYPE)
        if self.layout == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(low, self.packed, INT4_GROUP, self.scale_zero)
        else:
            y = torch.ops.aten._weight_int8pack_mm(low, self.codes, self.scales)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W for `ids` in float32: how a tied output matrix serves as the embedding (int8 only)."""
        if self.layout != "int8":
            raise RuntimeError("only an int8 matrix can serve as the token embedding")
        return F.embedding(ids, self.codes).float() * F.embedding(ids, self.scales[:, None]).float()

    def dequantized(self) -> torch.Tensor:
        """W [out, in] in float32, from the same codes and (bfloat16) scales the kernels use."""
        if self.layout == "int8":
            return self.codes.float() * self.scales.float()[:, None]
        out, groups = self.out_features, self.in_features // INT4_GROUP
        codes = torch.stack((self.nibbles & 15, self.nibbles >> 4), dim=-1).view(out, groups, INT4_GROUP)
        scale_zero = self.scale_zero.float()  # [groups, out, 2]
        scale = scale_zero[..., 0].t().unsqueeze(-1)
        zero = scale_zero[..., 1].t().unsqueeze(-1)
        return ((codes.float() - 8) * scale + zero).view(out, self.in_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, layout={self.layout}"


@dataclass
class PackingReport:
    """What loading packed: matrices per (source types, layout), for `llmchat info` and the bench.

    Only Q4_0/Q4_1 into int4 keeps the file's codes; every other mapping is a requantization,
    and the summary says so.
    """

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def of_plan(cls, plan: dict[str, tuple[str, frozenset[str]]]) -> PackingReport:
        """The report of a packing plan (model.packing_plan): what loading packs, or packed."""
        report = cls()
        for layout, sources in plan.values():
            report.add(sources, layout)
        return report

    def add(self, sources: Iterable[str], layout: str) -> None:
        key = ("+".join(sorted(set(sources))), layout)
        self.counts[key] = self.counts.get(key, 0) + 1

    def summary(self) -> str:
        if not self.counts:
            return "float"
        names = {"int4": f"int4 (groups of {INT4_GROUP})", "int8": "int8 (a scale per row)"}

        def how(sources: str, layout: str) -> str:
            exact = layout == "int4" and set(sources.split("+")) <= EXACT_INT4_SOURCES
            return names[layout] if exact else f"{names[layout]}, requantized"

        return ", ".join(f"{src} → {how(src, layout)} ×{n}" for (src, layout), n in sorted(self.counts.items()))


def packing_available(device: torch.device) -> bool:
    """The CPU kernels exist in this torch build (they came with PyTorch 2.5's CPU int4 path)."""
    aten = torch.ops.aten
    return device.type == "cpu" and all(
        hasattr(aten, op)
        for op in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm")
    )
