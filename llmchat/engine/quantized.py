"""Quantized safetensors checkpoints: GPTQ and AWQ (and gpt-oss's MXFP4 experts), dequantized to float weights at load.

The engine has one float Linear, so a quantized folder is read by turning each layer's packed
`qweight`/`qzeros`/`scales` (+ `g_idx`) group back into the `<layer>.weight` matrix the
checkpoint would have held unquantized. Weight memory is then that of a float model; the gain is
a smaller download and that GPTQ/AWQ-only releases load at all. Every other quantization format
(EXL2, bitsandbytes, fp8, ...) is refused when the folder is opened, before any weight is read.

Layouts (int32 words, 32 // bits values per word, lowest bits first):
  GPTQ  qweight [in / pack, out] packed along the input dim; qzeros [groups, out / pack] packed along
        the output dim; scales [groups, out]; g_idx [in] = group of each input row (act-order
        shuffles it). w = scale * (q - zero). Checkpoints in AutoGPTQ's original format
        (`checkpoint_format` "gptq", a.k.a. v1) store zero - 1, "gptq_v2" stores the zero itself.
        The last word of a row may be part padding (in or out not a multiple of 32 // bits).
  AWQ   (AutoAWQ "gemm") qweight [in, out / 8] and qzeros [groups, out / 8], both packed along the
        output dim in the interleaved order AWQ_ORDER; scales [groups, out]; groups are consecutive
        runs of group_size input rows. w = scale * (q - zero).
Both store the matrix [in, out]; Hugging Face Linear weights are [out, in].
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmchat.engine.errors import ModelLoadError
from llmchat.engine.jsonfile import read_json_object
from llmchat.engine.weights import SafetensorsWeights

# Nibble i of an AWQ word holds output column AWQ_ORDER[i] of its block of 8 (AutoAWQ's order_map).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column j of a block of 8 sits in nibble AWQ_REVERSE_ORDER[j].
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(8))

GPTQ_BITS = (2, 4, 8)  # the widths that pack whole values into an int32 (3-bit straddles words)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint format -> offset added to stored zeros
QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")
ALTERNATIVE = "use a GGUF file or an unquantized/GPTQ/AWQ safetensors folder"
_COLUMN_BLOCK = 1024  # output columns dequantized at a time, to bound temporaries for large matrices

# Tensor-name suffixes that give away a format whose config.json may not say so.
_FORMAT_BY_SUFFIX = (
    ((".q_weight", ".q_scale", ".q_invperm", ".q_groups", ".q_scale_max"), "EXL2"),
    ((".trellis", ".suh", ".svh"), "EXL3"),
    ((".SCB", ".weight_format"), "bitsandbytes 8-bit"),
    ((".absmax", ".quant_map", ".nested_absmax", ".quant_state.bitsandbytes__nf4"), "bitsandbytes 4-bit"),
    ((".quant_state.bitsandbytes__fp4",), "bitsandbytes 4-bit"),
    ((".weight_packed", ".weight_zero_point"), "compressed-tensors"),
    ((".weight_scale", ".weight_scale_inv", ".input_scale"), "fp8"),
)
_METHOD_NAMES = {
    "exl2": "EXL2",
    "exl3": "EXL3",
    "aqlm": "AQLM",
    "hqq": "HQQ",
    "fp8": "fp8",
    "fbgemm_fp8": "fp8 (fbgemm)",
    "compressed-tensors": "compressed-tensors",
    "marlin": "Marlin",
    "bitnet": "BitNet",
    "torchao": "torchao",
    "quanto": "quanto",
    "eetq": "EETQ",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
    "mxfp4": "MXFP4",
    "nvfp4": "NVFP4",
    "auto-round": "AutoRound",
}


@dataclass(frozen=True)
class QuantScheme:
    """How a GPTQ or AWQ checkpoint packs its weights, from its quantization config."""

    method: str  # gptq | awq
    bits: int
    group_size: int  # input rows per group; -1: one group spans all inputs
    zero_offset: int = 0  # added to each stored zero (1 for GPTQ v1 checkpoints)
    desc_act: bool = False

    @property
    def label(self) -> str:
        """Short description for `ModelPackage.quantization`, e.g. "gptq 4-bit g128"."""
        groups = f"g{self.group_size}" if self.group_size > 0 else "per-channel"
        return f"{self.method} {self.bits}-bit {groups}" + (" act-order" if self.desc_act else "")


def _refuse(where: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{where}: {what} checkpoints are not supported; {ALTERNATIVE}")


def read_quantization_config(folder: Path) -> tuple[dict[str, Any] | None, Path]:
    """The quantization config and the file it came from.

    config.json's `quantization_config` first; older AutoGPTQ and AutoAWQ releases wrote it to a
    file of its own (quantize_config.json, quant_config.json) and left config.json unmarked.
    """
    config_path = folder / "config.json"
    raw = read_json_object(config_path, ModelLoadError) or {}
    quant = raw.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise ModelLoadError(f"{config_path}: quantization_config is not an object")
    if quant:
        return quant, config_path
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        side = read_json_object(folder / name, ModelLoadError)
        if side:
            side.setdefault("quant_method", method)
            return side, folder / name
    return None, config_path


def _int(quant: dict[str, Any], keys: tuple[str, ...], default: int, where: Path) -> int:
    for key in keys:
        if quant.get(key) is not None:
            try:
                return int(quant[key])
            except (TypeError, ValueError):
                raise ModelLoadError(f"{where}: quantization {key} {quant[key]!r} is not an integer") from None
    return default


def scheme_from_config(quant: dict[str, Any], where: Path) -> QuantScheme:
    """Check a quantization config and return its scheme; anything but GPTQ/AWQ is refused."""
    method = str(quant.get("quant_method") or "").lower()
    if not method and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
        method = "bitsandbytes"
    if method == "bitsandbytes":
        width = "8-bit" if quant.get("load_in_8bit") or quant.get("_load_in_8bit") else "4-bit"
        raise _refuse(where, f"bitsandbytes {width}")
    if method == "gptq":
        bits = _int(quant, ("bits",), 4, where)
        layout = str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()
        if layout not in GPTQ_FORMATS:
            raise _refuse(where, f"GPTQ in the {layout!r} layout")
        if bits not in GPTQ_BITS:
            raise _refuse(where, f"GPTQ {bits}-bit")
        group = _int(quant, ("group_size",), 128, where)
        return QuantScheme("gptq", bits, group, GPTQ_FORMATS[layout], bool(quant.get("desc_act")))
    if method == "awq":
        bits = _int(quant, ("bits", "w_bit"), 4, where)
        version = str(quant.get("version") or quant.get("format") or "gemm").lower()
        if version != "gemm":
            raise _refuse(where, f"AWQ {version!r}")
        if bits != 4:
            raise _refuse(where, f"AWQ {bits}-bit")
        if quant.get("zero_point") is False:
            raise _refuse(where, "AWQ without zero points")
        return QuantScheme("awq", 4, _int(quant, ("group_size", "q_group_size"), 128, where))
    if not method:
        raise ModelLoadError(f"{where}: quantization config names no quant_method; {ALTERNATIVE}")
    raise _refuse(where, _METHOD_NAMES.get(method, f"{method!r}-quantized"))


def _format_from_names(names: set[str]) -> tuple[str, str] | None:
    """(format, example tensor) when tensor names show a quantization format, else None."""
    for suffixes, label in _FORMAT_BY_SUFFIX:
        for name in sorted(names):
            if name.endswith(suffixes):
                return label, name
    return None


def _quantized_prefixes(names: set[str]) -> set[str]:
    return {name.removesuffix(".qweight") for name in names if name.endswith(".qweight")}


def open_safetensors(
    folder: Path, files: list[Path]
) -> tuple[SafetensorsWeights | QuantizedWeights | Mxfp4Weights, str]:
    """The folder's weight source and what it stores ("none", or e.g. "gptq 4-bit g128").

    Refuses quantization formats other than GPTQ/AWQ (and gpt-oss's MXFP4 experts), from the config
    or, when the config is silent, from tell-tale tensor names.
    """
    plain = SafetensorsWeights(files)
    quant, where = read_quantization_config(folder)
    if quant is not None and str(quant.get("quant_method") or "").lower() == "mxfp4":
        mxfp4 = Mxfp4Weights(plain, folder)
        if not mxfp4.tensor_names() - plain.tensor_names():
            raise ModelLoadError(f"{where}: quant_method mxfp4, but no tensor is stored as MXFP4 blocks and scales")
        return mxfp4, "mxfp4 experts"
    if quant is not None:
        scheme = scheme_from_config(quant, where)
        weights = QuantizedWeights(plain, scheme, folder)
        weights.tensor_names()  # headers only: checks now that every quantized layer is complete
        return weights, scheme.label
    names = plain.tensor_names()
    found = _format_from_names(names)
    if found is not None:
        label, example = found
        raise ModelLoadError(f"{folder}: tensors like {example!r} are {label}, which is not supported; {ALTERNATIVE}")
    prefixes = _quantized_prefixes(names)
    if prefixes:
        example = f"{min(prefixes)}.qweight"
        raise ModelLoadError(
            f"{folder}: tensor {example!r} is quantized but config.json has no quantization_config; {ALTERNATIVE}"
        )
    return plain, "none"


def _fields(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Split each 32-bit word into its 32 // bits fields along the last dim: field j of a word is
    the one at position order[j] (default: lowest bits first).
    """
    positions = torch.tensor(order) if order is not None else torch.arange(32 // bits)
    shifts = (positions * bits).to(words.dtype)
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def _awq_codes(words: torch.Tensor) -> torch.Tensor:
    """AWQ qweight columns [in, out / 8] -> codes [out, in], de-interleaved (output-major, contiguous)."""
    shifts = (torch.tensor(AWQ_REVERSE_ORDER, dtype=words.dtype) * 4).view(1, 8, 1)
    return ((words.t().contiguous().unsqueeze(1) >> shifts) & 0xF).flatten(0, 1)


def _add_to_fields(words: torch.Tensor, value: int, bits: int) -> torch.Tensor:
    """Add `value` to every field of each 32-bit word, carries included, as GPTQModel turns v1 zeros
    into v2 ones: the exact inverse of its v2 -> v1 export, which subtracts the same constant from
    the word. (AutoGPTQ adds 1 to each field alone; the two agree unless a stored zero wraps.)
    """
    if value == 0:
        return words
    constant = sum(value << shift for shift in range(0, 32, bits))
    return (words.long() + constant) & 0xFFFFFFFF


def _check_int32(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int32:
        raise ModelLoadError(f"{name} is {tensor.dtype}, expected int32-packed values")


def _ordered_groups(group_size: int, in_features: int, scale_rows: int, name: str) -> torch.Tensor:
    """Each input row's group when rows are grouped in order (no act-order), checked against the
    scales so that a config's wrong group_size is an error rather than a garbled weight.
    """
    size = group_size if group_size > 0 else in_features
    groups = torch.arange(in_features) // size
    if int(groups[-1]) + 1 != scale_rows:
        raise ModelLoadError(
            f"{name}: {in_features} inputs in groups of {group_size} make {int(groups[-1]) + 1} groups, "
            f"but scales has {scale_rows} rows"
        )
    return groups


def _scale_into(
    weight: torch.Tensor, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor
) -> None:
    """weight = scale * (code - zero), each input with its group's: codes [out, in], zeros/scales [out, groups].

    Groups that are consecutive equal runs of inputs (everything but act-order) broadcast over an
    [out, groups, run] view instead of gathering a scale and a zero for every input.
    """
    out_features, in_features = codes.shape
    count = zeros.shape[1]
    run = in_features // count
    weight.copy_(codes)
    if run * count == in_features and torch.equal(groups, torch.arange(in_features) // run):
        view = weight.view(out_features, count, run)
        view.sub_(zeros.float().unsqueeze(2)).mul_(scales.float().unsqueeze(2))
    else:
        weight.sub_(zeros.float()[:, groups]).mul_(scales.float()[:, groups])


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int = 4,
    group_size: int = 128,
    zero_offset: int = 1,
    name: str = "gptq",
) -> torch.Tensor:
    """A GPTQ layer's float32 weight [out, in]; `zero_offset` is 1 for v1 ("gptq") checkpoints."""
    for part, tensor in (("qweight", qweight), ("qzeros", qzeros)):
        _check_int32(f"{name}.{part}", tensor)
    per_word = 32 // bits
    out_features = scales.shape[1]
    if qweight.shape[1] != out_features or qzeros.shape[1] != math.ceil(out_features / per_word):
        raise ModelLoadError(
            f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
            f"{tuple(scales.shape)} do not fit {bits}-bit GPTQ"
        )
    in_features = qweight.shape[0] * per_word if g_idx is None else g_idx.shape[0]
    if in_features > qweight.shape[0] * per_word:
        raise ModelLoadError(f"{name}: g_idx has {in_features} rows, qweight only {qweight.shape[0] * per_word}")
    if g_idx is None:
        groups = _ordered_groups(group_size, in_features, scales.shape[0], name)
    else:
        groups = g_idx.long()
        if int(groups.min()) < 0 or int(groups.max()) >= scales.shape[0]:
            raise ModelLoadError(
                f"{name}: g_idx refers to group {int(groups.max())}, scales has {scales.shape[0]} rows"
            )
    zeros = _fields(_add_to_fields(qzeros, zero_offset, bits), bits)[:, :out_features]
    weight = torch.empty(out_features, in_features, dtype=torch.float32)
    for start in range(0, out_features, _COLUMN_BLOCK):
        cols = slice(start, start + _COLUMN_BLOCK)
        codes = _fields(qweight[:, cols].t().contiguous(), bits)[:, :in_features]  # [cols, in]
        _scale_into(weight[cols], codes, zeros[:, cols].t(), scales[:, cols].t(), groups)
    return weight


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int = 128, name: str = "awq"
) -> torch.Tensor:
    """An AWQ (GEMM layout) layer's float32 weight [out, in]."""
    for part, tensor in (("qweight", qweight), ("qzeros", qzeros)):
        _check_int32(f"{name}.{part}", tensor)
    in_features, out_features = qweight.shape[0], scales.shape[1]
    if qweight.shape[1] * 8 != out_features or qzeros.shape != (scales.shape[0], qweight.shape[1]):
        raise ModelLoadError(
            f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
            f"{tuple(scales.shape)} do not fit 4-bit AWQ"
        )
    groups = _ordered_groups(group_size, in_features, scales.shape[0], name)
    zeros = _fields(qzeros, 4, AWQ_REVERSE_ORDER)  # [groups, out]
    weight = torch.empty(out_features, in_features, dtype=torch.float32)
    for start in range(0, out_features, _COLUMN_BLOCK):
        words = slice(start // 8, (start + _COLUMN_BLOCK) // 8)
        cols = slice(start, start + _COLUMN_BLOCK)
        codes = _awq_codes(qweight[:, words])  # [cols, in]
        _scale_into(weight[cols], codes, zeros[:, cols].t(), scales[:, cols].t(), groups)
    return weight


class QuantizedWeights:
    """A WeightSource that dequantizes GPTQ/AWQ layers as they stream past.

    Names look like an unquantized checkpoint's: each `<layer>.qweight/qzeros/scales/g_idx` group
    becomes one float32 `<layer>.weight`; every other tensor (norms, embeddings, biases, layers
    left unquantized) passes through untouched. A group's parts are held only until the last one
    arrives, so at most one layer's packed tensors are in memory beyond what the model keeps.
    """

    def __init__(self, inner: SafetensorsWeights, scheme: QuantScheme, folder: Path) -> None:
        self.inner = inner
        self.scheme = scheme
        self.folder = folder

    def _layout(self) -> tuple[set[str], dict[str, set[str]]]:
        """(all raw names, the parts each quantized layer has), checking every layer is complete."""
        names = self.inner.tensor_names()
        parts: dict[str, set[str]] = {}
        for prefix in _quantized_prefixes(names):
            present = {part for part in QUANT_PARTS if f"{prefix}.{part}" in names}
            missing = [part for part in ("qzeros", "scales") if part not in present]
            if missing:
                raise ModelLoadError(f"{self.folder}: {prefix}.qweight has no {prefix}.{missing[0]}")
            if prefix.endswith("embed_tokens"):
                raise ModelLoadError(f"{self.folder}: quantized embeddings ({prefix}) are not supported; {ALTERNATIVE}")
            if self.scheme.method == "awq":
                present.discard("g_idx")
            parts[prefix] = present
        return names, parts

    def quantized_types(self) -> dict[str, str]:
        return {}  # dequantized as they stream past: float by the time they reach the model

    def tensor_names(self) -> set[str]:
        names, parts = self._layout()
        quantized = {f"{prefix}.{part}" for prefix, present in parts.items() for part in present}
        return (names - quantized) | {f"{prefix}.weight" for prefix in parts}

    def tensors(self, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        _, parts = self._layout()
        pending: dict[str, dict[str, torch.Tensor]] = {}
        skipped = {name.removesuffix(".weight") for name in skip} & parts.keys()  # a quantized layer: all its parts
        raw_skip = set(skip) | {f"{prefix}.{part}" for prefix in skipped for part in parts[prefix]}
        for name, tensor in self.inner.tensors(raw_skip):
            prefix, _, part = name.rpartition(".")
            if prefix not in parts or part not in parts[prefix]:
                yield name, tensor
                continue
            pending.setdefault(prefix, {})[part] = tensor
            if pending[prefix].keys() == parts[prefix]:
                yield f"{prefix}.weight", self._dequantize(prefix, pending.pop(prefix))

    def _dequantize(self, prefix: str, group: dict[str, torch.Tensor]) -> torch.Tensor:
        name = f"{self.folder.name}: {prefix}"
        if self.scheme.method == "awq":
            return dequantize_awq(
                group["qweight"], group["qzeros"], group["scales"], group_size=self.scheme.group_size, name=name
            )
        return dequantize_gptq(
            group["qweight"],
            group["qzeros"],
            group["scales"],
            group.get("g_idx"),
            bits=self.scheme.bits,
            group_size=self.scheme.group_size,
            zero_offset=self.scheme.zero_offset,
            name=name,
        )


# e2m1 values of the 16 nibbles (transformers' FP4_VALUES)
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MXFP4_PARTS = ("blocks", "scales")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, name: str) -> torch.Tensor:
    """transformers' convert_moe_packed_tensors in float32: `blocks` [experts, out, groups, 16] (two e2m1
    values a byte, the low nibble first) times 2 ** (`scales` [experts, out, groups] - 127) ->
    [experts, in, out] (the unquantized gpt-oss parameter's layout)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ModelLoadError(
            f"{name}: MXFP4 blocks {tuple(blocks.shape)} ({blocks.dtype}) do not fit scales "
            f"{tuple(scales.shape)} ({scales.dtype})"
        )
    experts, out = blocks.shape[:2]
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.reshape(experts, out, -1).transpose(1, 2).contiguous()


class Mxfp4Weights:
    """A WeightSource for gpt-oss's MXFP4 checkpoints (`quant_method: mxfp4`, how OpenAI publishes
    gpt-oss): each expert stack's `<name>_blocks` + `<name>_scales` becomes the float `<name>` the
    unquantized checkpoint holds, dequantized as it streams past (dequantize_mxfp4); everything else
    (attention, router, biases, left in bfloat16) passes through.
    """

    def __init__(self, inner: SafetensorsWeights, folder: Path) -> None:
        self.inner = inner
        self.folder = folder

    def _packed(self) -> tuple[set[str], set[str]]:
        """(all raw names, the stacks stored as blocks + scales), checking both parts are there."""
        names = self.inner.tensor_names()
        stacks = {n.removesuffix(f"_{part}") for n in names for part in _MXFP4_PARTS if n.endswith(f"_{part}")}
        for stack in sorted(stacks):
            for part in _MXFP4_PARTS:
                if f"{stack}_{part}" not in names:
                    raise ModelLoadError(f"{self.folder}: MXFP4 tensor {stack!r} has no {stack}_{part}")
        return names, stacks

    def quantized_types(self) -> dict[str, str]:
        return {}  # dequantized as they stream past

    def tensor_names(self) -> set[str]:
        names, stacks = self._packed()
        return (names - {f"{s}_{part}" for s in stacks for part in _MXFP4_PARTS}) | stacks

    def tensors(self, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        _, stacks = self._packed()
        raw_skip = set(skip) | {f"{s}_{part}" for s in set(skip) & stacks for part in _MXFP4_PARTS}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.inner.tensors(raw_skip):
            stack, _, part = name.rpartition("_")
            if stack not in stacks or part not in _MXFP4_PARTS:
                yield name, tensor
                continue
            pending.setdefault(stack, {})[part] = tensor
            if len(pending[stack]) == len(_MXFP4_PARTS):
                group = pending.pop(stack)
                yield stack, dequantize_mxfp4(group["blocks"], group["scales"], name=f"{self.folder.name}: {stack}")
