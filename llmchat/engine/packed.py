"""Quantized weights kept packed on CPU and multiplied by PyTorch's quantized matmul kernels.

Why: decoding is bound by the bytes it reads per token. A GGUF's 4-bit matrices dequantized to
float32 are 8x larger than in the file; kept packed, every token reads a fraction of that. The
int4/int8 kernels take bfloat16 activations (their float32 variants are ~10x slower on CPU), so a
packed layer rounds its input to bfloat16 and returns float32; everything between the matmuls
(norms, RoPE, attention, the KV cache) stays in the model's float32.

The output projection is the exception: its result is the logits, and the int8 kernel's bfloat16
output made every logit near 25 a multiple of 0.125, so candidates tied and greedy decoding
picked by token id. It has its own layout, computed in float32 from end to end.

Three layouts:
  int4  one code 0..15 per weight; each group of INT4_GROUP consecutive input columns of an output
        row shares a (scale, zero): w = (q - 8) * scale + zero. The codes are kept as plain nibbles
        (`nibbles`, two a byte) with the (scale, zero) pairs (`scale_zero`), and the multiplying
        kernel's own copies are made at load (`prepare_kernels`): llmchat's int4 x int8 kernel (q4kernel.c)
        takes the nibbles and row-major scales (1/8 byte a weight); PyTorch's, where ours does not run,
        its opaque packing (`_convert_weight_to_int4pack_for_cpu`, half a byte a weight) for
        `_weight_int4pack_mm_for_cpu`. A prefill chunk dequantizes the matrix and runs one GEMM.
  int8  one code -127..127 per weight and one bfloat16 scale per output row: w = q * scale.
        `_weight_int8pack_mm` multiplies.
  int8-fp32out  (the output projection) int8 codes with a float32 scale per row, multiplied in
        float32: FBGEMM's fp16 GEMM (`quantized::linear_dynamic_fp16`: float32 activations,
        float32 accumulation and output) over the codes themselves — integers up to 127 are exact
        in fp16 — and the row scales applied to its float32 result, so the logits are the float32
        product over the packed weights. Measured on 2 AVX2 cores, 49152x576, one row: 3.2-3.7 ms,
        against 4.3-4.7 ms for the bfloat16 int8 kernel and 43-48 ms for that kernel in float32.
        FBGEMM pads the inner dimension of its matrix to a multiple of FP16_K_BLOCK; where that
        would cost more than float32 columns do, the columns past the last full block are kept as
        a float32 matrix instead (`fp16_columns`). Without FBGEMM (an ARM build) every column is.
        The FBGEMM matrix is built at load from the codes (the packed cache stores tensors only);
        the codes themselves are not kept: saving takes them back from the product matrices. A
        tied model's token embedding reads its rows from the GGUF file instead (GGUFEmbedding).

Which GGUF type goes where (`layout_for`): types of 4 bits or fewer per weight become int4 with
groups of 32. For Q4_1 (w = d*q + m) that is exact up to rounding d and m + 8d to bfloat16:
llama.cpp's quantizer gives each block's minimum code 0 and its maximum code 15, so the block's
min/max recover m and d. Q4_0 (w = d*(q - 8)) is exact the same way through its symmetric form (the
largest-magnitude weight has code 0). K-quants (Q2_K, Q3_K, Q4_K) are requantized per group of 32.
Types of 5 to 8 bits (Q5_*, Q6_K, Q8_0) become int8 with a scale per row (requantized: 4-bit groups
would lose their precision). The output projection, whatever its type, becomes int8-fp32out.
Float tensors stay float. `llmchat info` reports the mapping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmchat.engine import q4kernel

INT4_GROUP = 32
ACTIVATION_DTYPE = torch.bfloat16
# From this many rows (a prefill chunk) a float32 matmul over the matrix dequantized for the call
# beats the packed kernels, which are built for the few rows of decoding (AVX2, 3072x576 matrix:
# 512 rows 25 ms packed vs 15 ms dequantize + sgemm; 64 rows 2.9 ms vs 4.9 ms).
DEQUANTIZE_FROM_ROWS = 128
INT4_SOURCES = frozenset({"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"})
INT8_SOURCES = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"})
EXACT_INT4_SOURCES = frozenset({"Q4_0", "Q4_1"})  # their blocks are int4 groups of 32 already
OUTPUT_LAYOUT = "int8-fp32out"
LAYOUTS = ("int4", "int8", OUTPUT_LAYOUT)
# FBGEMM's fp16 matrix holds the inner dimension in blocks of this many rows, the last one padded
# (measured: 49152x576 takes the RSS of 49152x1024).
FP16_K_BLOCK = 512
# Output rows per FBGEMM matrix: prepacking copies its part of the codes to float32 first, and
# blocks keep that copy small (one 8192-row block of the demo's 49152x576 is as fast as one matrix).
OUTPUT_ROW_BLOCK = 8192
_FP16_ENGINES = ("x86", "fbgemm")  # quantized engines whose linear_prepack_fp16 is FBGEMM's


def layout_for(source_types: Iterable[str], *, output: bool = False) -> str | None:
    """The packed layout for a matrix made of tensors of these GGUF types; None keeps it float.

    A fused matrix (q/k/v, gate/up) takes the wider layout any of its parts needs. `output`: the
    matrix is the output projection, whose logits are computed in float32 (OUTPUT_LAYOUT).
    """
    types = set(source_types)
    if not types or not types <= INT4_SOURCES | INT8_SOURCES:
        return None
    if output:
        return OUTPUT_LAYOUT
    if types & INT8_SOURCES:
        return "int8"
    return "int4"


def fits_int4(out_features: int, in_features: int) -> bool:
    """The int4 kernel tiles 16 output rows and groups of INT4_GROUP inputs."""
    return out_features % 16 == 0 and in_features % INT4_GROUP == 0


def fp16_gemm_engine() -> str | None:
    """The quantized engine to prepack FBGEMM's fp16 matrices with (the current one when it can), or
    None when this torch build has no FBGEMM (ARM builds: the output projection stays float32)."""
    engines = torch.backends.quantized.supported_engines
    current = torch.backends.quantized.engine
    if current in _FP16_ENGINES:
        return current
    return next((engine for engine in _FP16_ENGINES if engine in engines), None)


def fp16_columns(in_features: int) -> int:
    """How many leading input columns of the output projection go to FBGEMM's fp16 matrix; the
    rest are a float32 matrix. FBGEMM pads its inner dimension to FP16_K_BLOCK rows: a tail that
    fills less than half a block costs fewer bytes as float32 columns (4 each) than padded."""
    if fp16_gemm_engine() is None:
        return 0
    tail = in_features % FP16_K_BLOCK
    return in_features - tail if 0 < tail < FP16_K_BLOCK // 2 else in_features


def _padded(columns: int) -> int:
    return -(-columns // FP16_K_BLOCK) * FP16_K_BLOCK


def packed_bytes(layout: str, out_features: int, in_features: int, sources: Iterable[str] = ()) -> int:
    """Bytes a PackedLinear holds for a matrix of this shape (bias aside), once `prepare_kernels` ran:
    FBGEMM's matrices included, and an int4 matrix's copies for the kernel that multiplies it (row-major
    scales, and zeros unless `sources` make them all 0, for llmchat's; PyTorch's packing else)."""
    weights = out_features * in_features
    if layout == "int8":  # codes, a bfloat16 scale per row (and a float32 copy for llmchat's kernel)
        return weights + 2 * out_features + (4 * out_features if q4kernel.available() is not None else 0)
    if layout == OUTPUT_LAYOUT:
        if q4kernel.available() is not None:
            return weights + 4 * out_features  # the codes, float32 scales
        fp16 = fp16_columns(in_features)
        product = 2 * out_features * _padded(fp16) + 4 * out_features * (in_features - fp16)
        return product + 4 * out_features  # + float32 scales
    groups = out_features * (in_features // INT4_GROUP)
    nibbles = weights // 2
    if q4kernel.available() is None:
        kernel_copies = weights // 2  # PyTorch's int4 packing
    else:
        kernel_copies = groups * (2 if _int4_fit(tuple(sorted(set(sources)))) == "symmetric" else 4)
    return nibbles + groups * 4 + kernel_copies  # + bf16 (scale, zero) pairs


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


def int8_rows(weight: torch.Tensor, scale_dtype: torch.dtype = ACTIVATION_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [out, in] (int8, -127..127) and one scale per output row for `weight` [out, in].

    The scale is the largest magnitude / 127 in `scale_dtype` (the int8 kernel's bfloat16, or
    float32 for the output projection), rounded up (never clipping the largest weight), and the
    codes are taken against that rounded scale: every weight within half a step.
    """
    w = weight.float()
    exact = w.abs().amax(-1) / 127
    scale = exact.to(scale_dtype)
    if scale_dtype != torch.float32:
        bump = (scale.float() * (1 + 2**-7)).to(scale_dtype)
        scale = torch.where(scale.float() < exact, bump, scale)
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


@contextmanager
def _quantized_engine(name: str) -> Iterator[None]:
    """Run with torch's quantized engine set to `name` (prepacking reads the global setting)."""
    previous = torch.backends.quantized.engine
    if previous == name:
        yield
        return
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


_BUFFERS = {
    "int4": ("nibbles", "scale_zero"),
    "int8": ("codes", "scales"),
    OUTPUT_LAYOUT: ("codes", "scales"),
}


_DERIVED = ("_rows", "_aten", "_float_scales")  # what the helpers below keep on a layer, by name


def _kept(owner: nn.Module, name: str, source: torch.Tensor, make: Callable[[], Any]) -> Any:
    """`make()`'s result, made from `source` on first use and kept on `owner` as `name`; made again
    whenever `source` was replaced (load_state_dict, `to`)."""
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] is not source:
        cached = (source, make())
        owner.__dict__[name] = cached
    return cached[1]


def row_scales(owner: nn.Module, scale_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`scale_zero` ([..., in/group, out, 2], PyTorch's kernel's layout) as scales and zeros row by row
    ([..., out, in/group] each; zeros None when all are 0, as Q4_0's) for llmchat's int4 kernel (`_kept`)."""

    def make() -> tuple[torch.Tensor, torch.Tensor | None]:
        scales = scale_zero[..., 0].transpose(-1, -2).contiguous()
        zeros = scale_zero[..., 1].transpose(-1, -2).contiguous()
        return scales, None if not zeros.any() else zeros

    return _kept(owner, "_rows", scale_zero, make)


def aten_int4(owner: nn.Module, nibbles: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's int4 packing of `nibbles` ([..., out, in/2]; one matrix, or a stack packed matrix by matrix),
    for `_weight_int4pack_mm_for_cpu` (`_kept`; from `codes`, the one matrix's int32 codes, where the caller
    has them). Only where llmchat's kernel does not run (see `prepare_kernels`)."""

    def make() -> torch.Tensor:
        if codes is not None:
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        matrices = nibbles.reshape(-1, *nibbles.shape[-2:])
        packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(_codes(matrix), 1) for matrix in matrices]
        return torch.stack(packed) if nibbles.dim() == 3 else packed[0]

    return _kept(owner, "_aten", nibbles, make)


def float_scales(owner: nn.Module, scales: torch.Tensor) -> torch.Tensor:
    """The int8 layout's bfloat16 row scales in float32, for llmchat's int8 x float32 product (which
    takes float32 activations, so its results are closer to the float reference than PyTorch's bfloat16
    kernel's; `_kept`)."""
    return _kept(owner, "_float_scales", scales, scales.float)


def _codes(nibbles: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] (int32, 0..15) from nibbles [out, in/2] (even column in the low half)."""
    return torch.stack((nibbles & 15, nibbles >> 4), dim=-1).view(nibbles.shape[0], -1).to(torch.int32)


def derived_bytes(owner: nn.Module) -> int:
    """Bytes of what the helpers above made and keep on `owner` (for the memory bill)."""
    total = 0
    for name in _DERIVED:
        if (cached := owner.__dict__.get(name)) is not None:
            kept = cached[1] if isinstance(cached[1], tuple) else (cached[1],)
            total += sum(t.nbytes for t in kept if t is not None)
    return total


def prefill_product(
    kernel: q4kernel.Int4Kernel,
    x: torch.Tensor,
    nibbles: torch.Tensor,
    row_scales: tuple[torch.Tensor, torch.Tensor | None],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A prefill chunk (many rows) times an int4 matrix: the matrix dequantized by llmchat's kernel into a
    reused scratch matrix, then one GEMM, in bfloat16 where the CPU has native bfloat16 (q4kernel.prefill_dtype)."""
    dtype = q4kernel.prefill_dtype()
    with q4kernel.scratch.lock:
        weight = kernel.dequantize(nibbles, *row_scales, q4kernel.scratch.matrix(*_unpacked_shape(nibbles), dtype))
        y = F.linear(x.to(dtype), weight).to(x.dtype)
    return y if bias is None else y + bias


def _unpacked_shape(nibbles: torch.Tensor) -> tuple[int, int]:
    """[out, in] of an int4 matrix stored as nibbles [out, in/2]."""
    return nibbles.shape[-2], 2 * nibbles.shape[-1]


def prepare_kernels(model: nn.Module) -> None:
    """Make at load what the packed layers' kernels need beside their codes: for llmchat's kernel (built
    here if need be) the int4 layers' row-major scales and the prefill scratch and the int8 layers' float32
    scales, else PyTorch's int4 packing.

    At load, not during the first answer: made there, among a prefill's short-lived tensors (and after
    the compiler's run raised glibc's mmap threshold), they kept the heap from shrinking, and the demo's
    process stayed 100 MB (15%) above its memory bill at 2k tokens."""
    ours = q4kernel.available() is not None
    largest = 0
    for module in model.modules():
        if ours and isinstance(module, PackedLinear | PackedExperts) and module.layout == "int8":
            float_scales(module, module.scales if isinstance(module, PackedLinear) else module.experts.scales)
        if isinstance(module, PackedLinear | PackedExperts) and module.layout == "int4":
            nibbles = module.nibbles if isinstance(module, PackedLinear) else module.experts.nibbles
            if ours:
                module._row_scales()
                largest = max(largest, math.prod(_unpacked_shape(nibbles)))
            else:
                aten_int4(module, nibbles)
    if largest:
        q4kernel.scratch.reserve(largest, q4kernel.prefill_dtype())


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed as int4 groups, int8 rows, or int8 rows multiplied in float32
    (the output projection; see the module docstring)."""

    # buffers of the int4 layout
    nibbles: torch.Tensor
    scale_zero: torch.Tensor
    # buffers of the int8 layouts (the output projection saves `codes` but does not keep them)
    codes: torch.Tensor
    scales: torch.Tensor
    # the output projection's float32 columns past FBGEMM's, as codes [in - split, out] (not saved)
    rest: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layout: str,
        sources: Iterable[str] = (),
    ) -> None:
        """`weight` [out, in] in float; it is packed here and not kept. `bias` is kept in float32.

        `sources` (the checkpoint's types) is kept for the report.
        """
        super().__init__()
        weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape
        if layout == "int4" and not fits_int4(self.out_features, self.in_features):
            raise ValueError(f"a {self.out_features}x{self.in_features} matrix does not fit the int4 kernel")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown packed layout {layout!r}")
        self.layout = layout
        self.sources = tuple(sorted(set(sources)))
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        if layout == "int4":
            fit = _int4_fit(self.sources)
            codes, scale, zero = _by_rows(lambda rows: int4_groups(rows, fit=fit), weight)
            nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)  # even column low
            self.register_buffer("nibbles", nibbles)
            if q4kernel.available() is None:  # PyTorch's kernel multiplies it: its packing, from the codes at hand
                aten_int4(self, nibbles, codes)
            # [in/group, out, 2]: the kernel's layout of the groups' (scale, zero)
            scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(ACTIVATION_DTYPE).contiguous()
            self.register_buffer("scale_zero", scale_zero)
        elif layout == "int8":
            codes8, scale8 = _by_rows(int8_rows, weight)
            self.register_buffer("codes", codes8)
            self.register_buffer("scales", scale8)
        else:
            codes8, scale32 = _by_rows(lambda part: int8_rows(part, torch.float32), weight)
            self.register_buffer("scales", scale32)
            self._pack_output(codes8)

    @classmethod
    def from_buffers(cls, layout: str, sources: Iterable[str], buffers: dict[str, torch.Tensor]) -> PackedLinear:
        """A layer from the buffers (and bias) a packed one saved (see packed_cache.py)."""
        names = _BUFFERS.get(layout)
        if names is None:
            raise ValueError(f"unknown packed layout {layout!r}")
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
        if layout == OUTPUT_LAYOUT:
            if buffers["scales"].dtype != torch.float32 or buffers["codes"].dtype != torch.int8:
                raise ValueError("an output projection needs int8 codes and float32 scales")
            layer.register_buffer("scales", buffers["scales"])
            layer._pack_output(buffers["codes"])
            return layer
        for name in names:
            layer.register_buffer(name, buffers[name])
        return layer

    def _pack_output(self, codes: torch.Tensor) -> None:
        """The output projection's product matrices from its codes: the codes themselves where llmchat's
        kernel runs (q4kernel.Int4Kernel.int8_mm: one byte a weight, 49152x576 in 1.0 ms against 3.1 ms
        for the FBGEMM matrices, one row, 2 Zen 4 cores); else FBGEMM fp16 matrices of OUTPUT_ROW_BLOCK
        rows over the first `fp16_columns` columns, the rest as float32 codes."""
        self._fp16: list[Any] = []
        if q4kernel.available() is not None:
            self.split = 0
            self.register_buffer("codes", codes.contiguous(), persistent=False)  # saved by _save_to_state_dict
            return
        self.split = fp16_columns(self.in_features)
        engine = fp16_gemm_engine()
        if self.split and engine is not None:
            with _quantized_engine(engine):
                for begin in range(0, self.out_features, OUTPUT_ROW_BLOCK):
                    block = codes[begin : begin + OUTPUT_ROW_BLOCK, : self.split].float()
                    self._fp16.append(torch.ops.quantized.linear_prepack_fp16(block, None))
        # [in - split, out]: BLAS streams a row-major [in, out] matrix fastest for few rows (model.Linear)
        self.register_buffer("rest", codes[:, self.split :].t().float().contiguous(), persistent=False)

    @property
    def opaque_bytes(self) -> int:
        """Bytes held outside buffers (FBGEMM's padded fp16 matrices, the int4 kernel's copies), for the memory bill."""
        if self.layout != OUTPUT_LAYOUT or not self._fp16:
            return derived_bytes(self)
        return 2 * self.out_features * _padded(self.split)

    def _output_codes(self) -> torch.Tensor:
        """The output projection's codes [out, in] (int8), taken back from its matrices block by
        block (exact: they are integers in fp16 and float32)."""
        if self._buffers.get("codes") is not None:
            return self.codes
        blocks = []
        for begin in range(0, self.out_features, OUTPUT_ROW_BLOCK):
            parts = [self.rest[:, begin : begin + OUTPUT_ROW_BLOCK].t()]
            if self._fp16:
                parts.insert(0, torch.ops.quantized.linear_unpack_fp16(self._fp16[begin // OUTPUT_ROW_BLOCK])[0])
            blocks.append(torch.cat(parts, dim=1).round().to(torch.int8))
        return torch.cat(blocks)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """The output projection keeps no codes; it saves them (the packed cache's tensors)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == OUTPUT_LAYOUT:
            destination[prefix + "codes"] = self._output_codes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == OUTPUT_LAYOUT:
            return self._float32_product(x)
        kernel = q4kernel.available()
        if x.shape[0] >= DEQUANTIZE_FROM_ROWS:
            if kernel is not None and self.layout == "int4":
                return prefill_product(kernel, x, self.nibbles, self._row_scales(), self.bias)
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        if kernel is not None:
            if self.layout == "int4":
                return kernel.mm(x.float(), self.nibbles, *self._row_scales(), self.bias).to(x.dtype)
            return kernel.int8_mm(x.float(), self.codes, float_scales(self, self.scales), self.bias).to(x.dtype)
        low = x.to(ACTIVATION_DTYPE)
        if self.layout == "int4":
            packing = aten_int4(self, self.nibbles)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(low, packing, INT4_GROUP, self.scale_zero)
        else:
            y = torch.ops.aten._weight_int8pack_mm(low, self.codes, self.scales)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _row_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The int4 groups' scales and zeros row by row, for llmchat's int4 kernel (`row_scales`)."""
        return row_scales(self, self.scale_zero)

    def _float32_product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in float32 for any number of rows: (x · codes^T) from FBGEMM's fp16 matrices and
        the float32 tail, then times the row scales."""
        wide = x.float()
        if self._buffers.get("codes") is not None:
            kernel = q4kernel.available()
            if kernel is not None:
                return kernel.int8_mm(wide, self.codes, self.scales, self.bias).to(x.dtype)
            y = wide @ self.codes.t().float()  # the kernel was switched off after load (tests)
        elif self._fp16:
            head = wide if self.split == self.in_features else wide[:, : self.split]
            parts = [torch.ops.quantized.linear_dynamic_fp16(head, matrix) for matrix in self._fp16]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            if self.split < self.in_features:
                y.addmm_(wide[:, self.split :], self.rest)
        else:
            y = wide @ self.rest
        y.mul_(self.scales)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """W [out, in] in float32, from the same codes and scales the kernels use."""
        if self.layout == OUTPUT_LAYOUT:
            return self._output_codes().float() * self.scales[:, None]
        if self.layout == "int8":
            return self.codes.float() * self.scales.float()[:, None]
        out, groups = self.out_features, self.in_features // INT4_GROUP
        codes = _codes(self.nibbles).view(out, groups, INT4_GROUP)
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
    expert_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # the experts' matrices, apart

    @classmethod
    def of_plan(
        cls, plan: dict[str, tuple[str, frozenset[str]]], stacks: Mapping[str, int] | None = None
    ) -> PackingReport:
        """The report of a packing plan (checkpoint.packing_plan): what loading packs, or packed.

        `stacks`: the entries that are stacks of experts (memory.expert_shapes) and how many
        matrices each holds; they are reported apart, counted by matrix.
        """
        report = cls()
        for name, (layout, sources) in plan.items():
            experts = (stacks or {}).get(name)
            report.add(sources, layout, experts or 1, experts=experts is not None)
        return report

    def add(self, sources: Iterable[str], layout: str, matrices: int = 1, *, experts: bool = False) -> None:
        counts = self.expert_counts if experts else self.counts
        key = ("+".join(sorted(set(sources))), layout)
        counts[key] = counts.get(key, 0) + matrices

    def summary(self) -> str:
        if not self.counts and not self.expert_counts:
            return "float"
        names = {
            "int4": f"int4 (groups of {INT4_GROUP})",
            "int8": "int8 (a scale per row)",
            OUTPUT_LAYOUT: "int8 (a scale per row) with float32 logits",
        }

        def how(sources: str, layout: str) -> str:
            exact = layout == "int4" and set(sources.split("+")) <= EXACT_INT4_SOURCES
            return names[layout] if exact else f"{names[layout]}, requantized"

        parts = [f"{src} → {how(src, layout)} ×{n}" for (src, layout), n in sorted(self.counts.items())]
        parts += [f"{src} experts → {how(src, layout)} ×{n}" for (src, layout), n in sorted(self.expert_counts.items())]
        return ", ".join(parts)


def packing_available(device: torch.device) -> bool:
    """The CPU kernels exist in this torch build (they came with PyTorch 2.5's CPU int4 path)."""
    aten = torch.ops.aten
    return device.type == "cpu" and all(
        hasattr(aten, op)
        for op in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm")
    )


class ExpertBuffers(nn.Module):
    """The stacked buffers of a PackedExperts, a child named `experts`: their state names read
    `<stack>.experts.<buffer>`, as the loader (checkpoint.build_transformer) expects of packed experts.
    Iterating gives each expert as a PackedLinear of its own, for inspection and tests."""

    nibbles: torch.Tensor
    scale_zero: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, layout: str, sources: tuple[str, ...], buffers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.layout, self.sources = layout, sources
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    def __len__(self) -> int:
        return len(next(iter(self.buffers())))

    def __getitem__(self, index: int) -> PackedLinear:
        if not 0 <= index < len(self):
            raise IndexError(index)
        buffers = {name: getattr(self, name)[index] for name in _BUFFERS[self.layout]}
        return PackedLinear.from_buffers(self.layout, self.sources, buffers)

    def __iter__(self) -> Iterator[PackedLinear]:
        return (self[index] for index in range(len(self)))


class PackedExperts(nn.Module):
    """A stack of expert matrices [experts, out, in] kept packed: PackedLinear's buffers of every
    expert stacked on a leading experts' dimension (in the child `experts`, ExpertBuffers).

    Why stacked, and a decode step's own entry (`products`): a decode step runs k experts with two
    kernel calls each (Qwen3-MoE: 16 layers x 8 experts x 2 = 256 calls a token), and a PackedLinear
    call per expert cost about ten small tensor operations besides its kernel (the input's and
    output's casts, the bias check, the weight, the sum), which cost more than the kernels. So the
    kernel's operands of every expert are views of the stacks, made once (`_operands`), and
    `products` makes the kernel calls alone on inputs the caller cast once for all k experts
    (MoE.decode_packed). Measured, the benchmark's 16 MoE layers for one token: 11.8 ms through one
    PackedLinear per expert, 8.0 ms so (best of 12, 2 shared AVX-512 cores).

    Joining the k experts into one kernel call per matrix (gate/up along their outputs, down along
    their inputs, which the int4 packing allows block by block) was measured and lost: gathering the
    chosen experts' 3 MiB of codes a layer into one matrix (index_select, ~260 us a layer on 2 cores)
    cost more than the 14 kernel calls it saved (~10 us each).
    """

    def __init__(self, layout: str, sources: Iterable[str], buffers: dict[str, torch.Tensor]) -> None:
        """`buffers`: PackedLinear's buffers of every expert (`_BUFFERS[layout]`), stacked on dimension 0."""
        super().__init__()
        if layout not in ("int4", "int8"):
            raise ValueError(f"experts cannot take the {layout!r} layout")
        if set(buffers) != set(_BUFFERS[layout]):
            raise ValueError(f"{layout} experts need {_BUFFERS[layout]}, got {sorted(buffers)}")
        if len({tensor.shape[0] for tensor in buffers.values()}) != 1:
            raise ValueError("the experts' buffers differ in their number of experts")
        self.layout, self.sources = layout, tuple(sorted(set(sources)))
        self.experts = ExpertBuffers(layout, self.sources, {k: v.contiguous() for k, v in buffers.items()})
        rows = buffers["nibbles" if layout == "int4" else "codes"]
        self.out_features = rows.shape[1]
        self.in_features = rows.shape[2] * (2 if layout == "int4" else 1)

    @classmethod
    def pack(cls, stacked: torch.Tensor, layout: str, sources: frozenset[str]) -> PackedExperts:
        """Pack a float stack [experts, out, in] expert by expert (PackedLinear), each expert's buffers
        copied into the stacks as it is packed (no second copy of the stack is ever held)."""
        buffers: dict[str, torch.Tensor] = {}
        for index, matrix in enumerate(stacked):
            layer = PackedLinear(matrix, None, layout, sources)
            for name in _BUFFERS[layout]:
                part = getattr(layer, name)
                if name not in buffers:
                    buffers[name] = part.new_empty((len(stacked), *part.shape))
                buffers[name][index] = part
        return cls(layout, sources, buffers)

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def opaque_bytes(self) -> int:
        """Bytes of the int4 kernel's copies of the stacks (`prepare_kernels`), for the memory bill."""
        return derived_bytes(self)

    def __getitem__(self, index: int) -> PackedLinear:
        return self.experts[index]

    def _operands(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every expert's kernel operands (codes, scales), views of the stacks: made on first use and
        again whenever a buffer was replaced (load_state_dict, `to`)."""
        if self.layout == "int4":
            stacks = (aten_int4(self, self.experts.nibbles), self.experts.scale_zero)
        else:
            stacks = (self.experts.codes, self.experts.scales)
        cached = self.__dict__.get("_views")
        if cached is None or any(a is not b for a, b in zip(cached[0], stacks, strict=True)):
            cached = (stacks, list(zip(*(stack.unbind(0) for stack in stacks), strict=True)))
            self.__dict__["_views"] = cached
        return cached[1]

    def products(self, inputs: Sequence[torch.Tensor], ids: Sequence[int]) -> list[torch.Tensor]:
        """inputs[i] (ACTIVATION_DTYPE, few rows) times expert ids[i], each in ACTIVATION_DTYPE:
        the kernel calls alone (see the class docstring)."""
        operands = self._operands()
        if self.layout == "int4":
            int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            return [int4_mm(x, operands[e][0], INT4_GROUP, operands[e][1]) for x, e in zip(inputs, ids, strict=True)]
        int8_mm = torch.ops.aten._weight_int8pack_mm
        return [int8_mm(x, *operands[e]) for x, e in zip(inputs, ids, strict=True)]

    def rows(self, x: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        """Row i of the result: x's row i (or its only row) times expert ids[i]; [k, out] in x's dtype.

        A decode step's experts in one call of llmchat's int4 kernel where it runs (one thread team
        for all k, the int4 layout's grouped product), else PyTorch's kernels one expert at a time."""
        kernel = q4kernel.available()
        if self.layout == "int4" and kernel is not None:
            ids_tensor = torch.tensor(ids, dtype=torch.int64)
            return kernel.experts(x.float(), self.experts.nibbles, *self._row_scales(), ids_tensor).to(x.dtype)
        if kernel is not None:  # int8: one float32 product per expert
            wide, scales = x.float(), float_scales(self, self.experts.scales)
            rows = [wide if wide.shape[0] == 1 else wide[i : i + 1] for i in range(len(ids))]
            products = [
                kernel.int8_mm(row, self.experts.codes[e], scales[e], None) for row, e in zip(rows, ids, strict=True)
            ]
            return torch.cat(products).to(x.dtype)
        low = x.to(ACTIVATION_DTYPE)
        inputs = [low] * len(ids) if low.shape[0] == 1 else list(low.split(1))
        return torch.cat(self.products(inputs, ids)).to(x.dtype)

    def _row_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stacks' int4 scales and zeros row by row ([experts, out, in/group]; `row_scales`)."""
        return row_scales(self, self.experts.scale_zero)

    def matmul(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """x [m, in] times expert `index`, in x's dtype (a prefill's experts: PackedLinear's forward)."""
        if x.shape[0] >= DEQUANTIZE_FROM_ROWS:
            if self.layout == "int4" and (kernel := q4kernel.available()) is not None:
                scales, zeros = self._row_scales()
                row_scales = (scales[index], None if zeros is None else zeros[index])
                return prefill_product(kernel, x, self.experts.nibbles[index], row_scales)
            return F.linear(x, self.dequantized(index).to(x.dtype))
        if self.layout == "int8" and (kernel := q4kernel.available()) is not None:
            scales = float_scales(self, self.experts.scales)[index]
            return kernel.int8_mm(x.float(), self.experts.codes[index], scales, None).to(x.dtype)
        return self.rows(x, [index] * x.shape[0])

    def dequantized(self, index: int) -> torch.Tensor:
        """Expert `index`'s W [out, in] in float32, from the codes and scales the kernels use."""
        return self[index].dequantized()

    def extra_repr(self) -> str:
        return f"{len(self)} experts, in={self.in_features}, out={self.out_features}, layout={self.layout}"
