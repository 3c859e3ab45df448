"""GPTQ and AWQ safetensors checkpoints: unpacking, end-to-end loading, and refused formats.

The loader is checked against references written here from the published layouts, never against
its own helpers:
- hand-made words whose unpacked values are worked out in the comments;
- a round-to-nearest quantizer that packs with explicit per-field shifts, the way the libraries'
  packers do (GPTQModel's `pack_original`, AutoAWQ's `WQLinear_GEMM.from_linear` and its
  `order_map`), and exports GPTQ v1 zeros the way GPTQModel's `convert_gptq_v2_to_v1_format` does
  (subtracting 0x11111111 from each packed word).
(The loader was also checked once, outside this suite, against the dequantization code of AutoAWQ
0.2.9 and GPTQModel 7.7.0 on random words: identical results.)

End to end, a tiny model's projections are quantized here, written as a GPTQ/AWQ folder, and
llmchat's logits and greedy tokens for it must equal those for the same folder with the reference's
dequantized float weights written as plain `.weight` tensors. transformers cannot be the reference:
it needs optimum + gptqmodel for GPTQ/AWQ, which are not installed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmchat
from llmchat.cli import main
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.package import open_package
from llmchat.engine.quantized import dequantize_awq, dequantize_gptq

TinyModelFactory = Callable[..., Path]
GREEDY = llmchat.SamplingParams(temperature=0)
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ from_linear: nibble i holds column order_map[i]


pytestmark = pytest.mark.usefixtures("one_thread")


def _words(values: list[int]) -> list[int]:
    """Unsigned 32-bit values as the signed int32 safetensors stores."""
    return [v - (1 << 32) if v >= 1 << 31 else v for v in values]


def _int32(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


# --- hand-made words ---------------------------------------------------------------------------


def test_gptq_words_unpack_down_the_input_rows_lowest_bits_first() -> None:
    # qweight [in/8 = 1, out = 8]: column 0 holds 0x76543210, i.e. nibble k = k for input rows 0..7;
    # column 1 holds 0xFEDCBA98 (negative as int32): rows 0..7 = 8..15; the rest are 0.
    qweight = _int32([_words([0x76543210, 0xFEDCBA98, 0, 0, 0, 0, 0, 0])])
    scales = torch.ones(1, 8, dtype=torch.float16)
    scales[0, 1] = 0.5
    expected = torch.zeros(8, 8)  # [out, in]
    expected[0] = torch.arange(8) - 8.0  # zero 8 (the symmetric 4-bit zero)
    expected[1] = (torch.arange(8) + 8 - 8.0) * 0.5
    expected[2:] = -8.0
    # v2 stores the zero itself: 8 in all 8 nibbles of the one qzeros word.
    v2 = dequantize_gptq(qweight, _int32([_words([0x88888888])]), scales, None, group_size=-1, zero_offset=0)
    # v1 (AutoGPTQ) stores zero - 1 = 7.
    v1 = dequantize_gptq(qweight, _int32([_words([0x77777777])]), scales, None, group_size=-1, zero_offset=1)
    assert torch.equal(v2, expected)
    assert torch.equal(v1, expected)


def test_gptq_zeros_are_packed_along_the_output_columns() -> None:
    # qzeros word 0x76543210 gives output column j the zero j; all weights 0, scale 1 -> w[j, :] = -j.
    qweight = torch.zeros(1, 8, dtype=torch.int32)
    scales = torch.ones(1, 8, dtype=torch.float16)
    weight = dequantize_gptq(qweight, _int32([[0x76543210]]), scales, None, group_size=-1, zero_offset=0)
    assert torch.equal(weight, -torch.arange(8.0).view(8, 1).expand(8, 8))


def test_awq_words_are_packed_along_the_outputs_in_interleaved_order() -> None:
    # qweight [in = 1, out/8 = 1] holding 0x76543210: nibble i = i belongs to column order_map[i]:
    # nibble 0 -> col 0, 1 -> col 2, 2 -> col 4, 3 -> col 6, 4 -> col 1, 5 -> col 3, 6 -> col 5, 7 -> col 7,
    # so columns 0..7 read 0, 4, 1, 5, 2, 6, 3, 7.
    scales = torch.ones(1, 8, dtype=torch.float16)
    weight = dequantize_awq(_int32([[0x76543210]]), _int32([[0]]), scales, group_size=1)
    assert weight.flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # The same word as zeros (weights 0) gives the negated sequence: no +1 in AWQ.
    zeros = dequantize_awq(_int32([[0]]), _int32([[0x76543210]]), scales, group_size=1)
    assert zeros.flatten().tolist() == [0, -4, -1, -5, -2, -6, -3, -7]


# --- a reference quantizer ---------------------------------------------------------------------


@dataclass
class Quantized:
    """A layer quantized by the reference: integer codes, zeros, fp16 scales, and its float weight."""

    codes: torch.Tensor  # [in, out] int64
    zeros: torch.Tensor  # [groups, out] int64
    scales: torch.Tensor  # [groups, out] float16
    g_idx: torch.Tensor  # [in] group of each input row
    bits: int

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32: scale * (code - zero), row by row."""
        rows = [(self.codes[i] - self.zeros[g]).float() * self.scales[g].float() for i, g in enumerate(self.g_idx)]
        return torch.stack(rows).t().contiguous()


def quantize(weight: torch.Tensor, bits: int, g_idx: torch.Tensor, *, sym: bool) -> Quantized:
    """Round-to-nearest per group of a [out, in] weight; group g holds the input rows with g_idx == g."""
    w = weight.t().double()  # [in, out]
    maxq = (1 << bits) - 1
    groups = int(g_idx.max()) + 1
    zeros = torch.empty(groups, w.shape[1], dtype=torch.int64)
    scales = torch.empty(groups, w.shape[1], dtype=torch.float16)
    for g in range(groups):
        rows = w[g_idx == g]
        if sym:
            scale = (2 * rows.abs().amax(0) / maxq).clamp_min(1e-5)
            zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
        else:
            low, high = rows.amin(0).clamp_max(0), rows.amax(0).clamp_min(0)
            scale = ((high - low) / maxq).clamp_min(1e-5)
            zero = torch.round(-low / scale).long().clamp(0, maxq)
        scales[g] = scale.half()
        zeros[g] = zero
    codes = torch.round(w / scales[g_idx].double()).long() + zeros[g_idx]
    return Quantized(codes.clamp(0, maxq), zeros, scales, g_idx, bits)


def _signed(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (int64) -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight: word r of a column holds rows r*n .. r*n+n-1, row r*n+k at bits*k."""
    per_word = 32 // bits
    words = torch.zeros(values.shape[0] // per_word, values.shape[1], dtype=torch.int64)
    for k in range(per_word):
        words |= values[k::per_word] << (bits * k)
    return _signed(words)


def pack_columns(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """Columns into words: field i of word c holds column c*n + order[i] (order: identity for GPTQ).

    Like GPTQModel's packer, a last word with fewer columns left is filled as far as they go.
    """
    per_word = 32 // bits
    order = order or list(range(per_word))
    columns = values.shape[1]
    words = torch.zeros(values.shape[0], -(-columns // per_word), dtype=torch.int64)
    for c in range(words.shape[1]):
        for i in range(per_word):
            if c * per_word + order[i] < columns:
                words[:, c] |= values[:, c * per_word + order[i]] << (bits * i)
    return _signed(words)


def gptq_tensors(q: Quantized, *, v1: bool, act_order: bool) -> dict[str, torch.Tensor]:
    qzeros = pack_columns(q.zeros, q.bits)
    if v1:  # GPTQModel's v2 -> v1 export: subtract 1 from every field of the word, borrows included
        one_per_field = sum(1 << shift for shift in range(0, 32, q.bits))
        qzeros = _signed(qzeros.long() - one_per_field)
    parts = {"qweight": pack_rows(q.codes, q.bits), "qzeros": qzeros, "scales": q.scales}
    if act_order:
        parts["g_idx"] = q.g_idx.to(torch.int32)
    return parts


def awq_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    return {
        "qweight": pack_columns(q.codes, 4, AWQ_ORDER_MAP),
        "qzeros": pack_columns(q.zeros, 4, AWQ_ORDER_MAP),
        "scales": q.scales,
    }


def _groups(in_features: int, group_size: int, *, shuffled: bool, seed: int = 0) -> torch.Tensor:
    """g_idx: rows in order, or (act-order) visited in a random order and grouped in that order."""
    size = group_size if group_size > 0 else in_features
    if not shuffled:
        return torch.arange(in_features) // size
    order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[order] = torch.arange(in_features) // size
    return g_idx


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


# --- unpacking against the reference -----------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "act_order", "v1"),
    [
        pytest.param(4, 16, True, False, True, id="4bit-g16-sym-v1"),
        pytest.param(4, 16, False, False, False, id="4bit-g16-asym-v2"),
        pytest.param(4, 16, False, False, True, id="4bit-g16-asym-v1-borrows"),
        pytest.param(4, 16, True, True, True, id="4bit-g16-act-order"),
        pytest.param(4, 32, False, True, False, id="4bit-g32-asym-act-order-v2"),
        pytest.param(4, -1, True, False, True, id="4bit-per-channel"),
        pytest.param(8, 16, False, False, True, id="8bit-g16-asym-v1"),
        pytest.param(2, 32, False, True, False, id="2bit-g32-act-order"),
    ],
)
def test_gptq_dequantization_matches_the_reference(
    bits: int, group_size: int, sym: bool, act_order: bool, v1: bool
) -> None:
    weight = _weight(24, 64, seed=bits + group_size)
    weight[::3] = weight[::3].abs()  # outputs with no negative weight get zero 0 when asymmetric
    q = quantize(weight, bits, _groups(64, group_size, shuffled=act_order), sym=sym)
    if v1 and not sym:  # the case that needs carries: a stored zero - 1 wraps below 0 and borrows
        assert bool((q.zeros == 0).any())
    parts = gptq_tensors(q, v1=v1, act_order=act_order)
    got = dequantize_gptq(
        parts["qweight"],
        parts["qzeros"],
        parts["scales"],
        parts.get("g_idx"),
        bits=bits,
        group_size=group_size,
        zero_offset=1 if v1 else 0,
    )
    assert torch.equal(got, q.dequantized())
    # and the reference itself quantizes: each weight within half a step of the original
    step = q.scales.float()[q.g_idx].t()
    assert bool(((got - weight).abs() <= step * 0.5 + 1e-3).all())


@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_awq_dequantization_matches_the_reference(group_size: int) -> None:
    weight = _weight(40, 64, seed=group_size)
    q = quantize(weight, 4, _groups(64, group_size, shuffled=False), sym=False)
    parts = awq_tensors(q)
    got = dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"], group_size=group_size)
    assert torch.equal(got, q.dequantized())


def test_mismatched_shapes_are_a_clear_error() -> None:
    q = quantize(_weight(16, 32, seed=1), 4, _groups(32, 16, shuffled=False), sym=True)
    parts = awq_tensors(q)
    with pytest.raises(ModelLoadError, match="layer.0: .*do not fit 4-bit AWQ"):
        dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"][:, :8], group_size=16, name="layer.0")
    with pytest.raises(ModelLoadError, match="expected int32-packed"):
        dequantize_awq(parts["qweight"].float(), parts["qzeros"], parts["scales"], group_size=16)
    gptq = gptq_tensors(q, v1=False, act_order=False)
    with pytest.raises(ModelLoadError, match="groups of 32 make 1 groups, but scales has 2 rows"):
        dequantize_gptq(gptq["qweight"], gptq["qzeros"], gptq["scales"], None, group_size=32)


# --- end to end: a quantized tiny model --------------------------------------------------------


def _is_projection(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("proj.weight")


def _write_pair(
    source: Path, root: Path, quant_config: dict[str, Any], pack: Callable[[str, torch.Tensor], tuple[dict, Quantized]]
) -> tuple[Path, Path]:
    """(quantized folder, float folder holding the reference's dequantized weights) from `source`."""
    quantized_dir = Path(shutil.copytree(source, root / "quantized"))
    float_dir = Path(shutil.copytree(source, root / "float"))
    state = load_file(source / "model.safetensors")
    packed: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not _is_projection(name):
            packed[name] = plain[name] = tensor
            continue
        prefix = name.removesuffix(".weight")
        parts, q = pack(prefix, tensor)
        packed.update({f"{prefix}.{part}": value for part, value in parts.items()})
        plain[name] = q.dequantized()
    (quantized_dir / "model.safetensors").unlink()
    _save_sharded(packed, quantized_dir)
    save_file(plain, float_dir / "model.safetensors", metadata={"format": "pt"})
    config_path = quantized_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quant_config
    config_path.write_text(json.dumps(config))
    return quantized_dir, float_dir


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Two shards, every `scales` in the second: a layer's parts arrive far apart."""
    shards = {"model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.endswith(".scales")}}
    shards["model-00001-of-00002.safetensors"] = {k: v for k, v in tensors.items() if not k.endswith(".scales")}
    weight_map = {}
    for file, part in sorted(shards.items()):
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _assert_same_model(quantized_dir: Path, float_dir: Path, original: Path) -> None:
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    quantized = llmchat.load(quantized_dir, device="cpu", dtype="float32", context_length=64)
    reference = llmchat.load(float_dir, device="cpu", dtype="float32", context_length=64)
    got, want = quantized.logits(ids), reference.logits(ids)
    assert (got - want).abs().max().item() <= 1e-4
    unquantized = llmchat.load(original, device="cpu", dtype="float32", context_length=64).logits(ids)
    assert (got - unquantized).abs().max().item() > 1e-3  # the weights really were quantized

    def greedy(model: llmchat.LoadedModel) -> list[int]:
        events = model.generate(ids[:8], sampling=GREEDY, max_new_tokens=12, stop_on_eos=False)
        return [e.token_id for e in events if hasattr(e, "token_id")]

    tokens = greedy(quantized)
    assert len(tokens) == 12 and tokens == greedy(reference)


def test_gptq_v1_act_order_folder_loads_like_its_float_weights(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    def pack(prefix: str, weight: torch.Tensor) -> tuple[dict, Quantized]:
        g_idx = _groups(weight.shape[1], 32, shuffled=True, seed=len(prefix))
        q = quantize(weight, 4, g_idx, sym=True)
        return gptq_tensors(q, v1=True, act_order=True), q

    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True}
    config["checkpoint_format"] = "gptq"
    original = tiny_model("llama")
    quantized_dir, float_dir = _write_pair(original, tmp_path, config, pack)
    assert open_package(quantized_dir).quantization == "gptq 4-bit g32 act-order"
    _assert_same_model(quantized_dir, float_dir, original)


def test_gptq_v2_asym_per_channel_folder_loads(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    def pack(prefix: str, weight: torch.Tensor) -> tuple[dict, Quantized]:
        q = quantize(weight, 4, _groups(weight.shape[1], -1, shuffled=False), sym=False)
        return gptq_tensors(q, v1=False, act_order=False), q

    config = {"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": False, "format": "gptq_v2"}
    original = tiny_model("llama")
    quantized_dir, float_dir = _write_pair(original, tmp_path, config, pack)
    assert open_package(quantized_dir).quantization == "gptq 4-bit per-channel"
    _assert_same_model(quantized_dir, float_dir, original)


def test_awq_folder_with_biases_loads_like_its_float_weights(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    def pack(prefix: str, weight: torch.Tensor) -> tuple[dict, Quantized]:
        q = quantize(weight, 4, _groups(weight.shape[1], 32, shuffled=False), sym=False)
        return awq_tensors(q), q

    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    original = tiny_model("qwen2")  # q/k/v biases pass through unquantized
    quantized_dir, float_dir = _write_pair(original, tmp_path, config, pack)
    package = open_package(quantized_dir)
    assert package.quantization == "awq 4-bit g32"
    names = package.weights.tensor_names()
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.self_attn.q_proj.bias" in names
    assert not any(name.endswith((".qweight", ".qzeros", ".scales")) for name in names)
    _assert_same_model(quantized_dir, float_dir, original)


def test_old_autogptq_side_file_is_read(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    """AutoGPTQ before transformers integration wrote quantize_config.json, not quantization_config."""
    folder = Path(shutil.copytree(tiny_model("llama"), tmp_path / "m"))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": False}))
    assert open_package(folder).quantization == "gptq 4-bit g128"


# --- refused formats ---------------------------------------------------------------------------


def _with_config(folder: Path, quant: dict[str, Any]) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = quant
    path.write_text(json.dumps(config))
    return folder


def _with_tensor(folder: Path, name: str, tensor: torch.Tensor) -> Path:
    state = load_file(folder / "model.safetensors")
    state[name] = tensor
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


REFUSALS = [
    pytest.param({"quant_method": "exl2", "bits": 4.65}, "EXL2", id="exl2-config"),
    pytest.param({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes 4-bit", id="bnb-4bit"),
    pytest.param({"load_in_8bit": True}, "bitsandbytes 8-bit", id="bnb-8bit-legacy"),
    pytest.param({"quant_method": "fp8", "fmt": "e4m3"}, "fp8", id="fp8"),
    pytest.param({"quant_method": "hqq"}, "HQQ", id="hqq"),
    pytest.param({"quant_method": "zipquant"}, "'zipquant'-quantized", id="unknown-method"),
    pytest.param({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ 3-bit", id="gptq-3bit"),
    pytest.param({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'marlin' layout", id="marlin"),
    pytest.param({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ 'gemv'", id="awq-gemv"),
]


@pytest.mark.parametrize(("quant", "named"), REFUSALS)
def test_unsupported_quantization_configs_are_refused(
    tiny_model: TinyModelFactory, tmp_path: Path, quant: dict[str, Any], named: str
) -> None:
    folder = _with_config(Path(shutil.copytree(tiny_model("llama"), tmp_path / "m")), quant)
    with pytest.raises(ModelLoadError) as info:
        open_package(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder / "config.json") in message
    assert named in message and "use a GGUF file or an unquantized/GPTQ/AWQ safetensors folder" in message


@pytest.mark.parametrize(
    ("tensor_name", "named"),
    [
        pytest.param("model.layers.0.self_attn.q_proj.q_weight", "EXL2", id="exl2-tensors"),
        pytest.param("model.layers.0.mlp.up_proj.weight.absmax", "bitsandbytes 4-bit", id="bnb-tensors"),
        pytest.param("model.layers.0.mlp.up_proj.qweight", "no quantization_config", id="gptq-without-config"),
    ],
)
def test_quantized_tensors_without_a_config_are_refused(
    tiny_model: TinyModelFactory, tmp_path: Path, tensor_name: str, named: str
) -> None:
    folder = _with_tensor(Path(shutil.copytree(tiny_model("llama"), tmp_path / "m")), tensor_name, torch.zeros(4))
    with pytest.raises(ModelLoadError) as info:
        open_package(folder)
    message = str(info.value)
    assert tensor_name in message and named in message and "GGUF" in message and "\n" not in message


def test_cli_reports_a_refused_format_in_one_line(
    tiny_model: TinyModelFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _with_config(Path(shutil.copytree(tiny_model("llama"), tmp_path / "m")), {"quant_method": "exl2"})
    code = main(["info", str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("llmchat: error: ") and "EXL2" in err


def test_incomplete_quantized_layer_is_refused(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    folder = _with_config(
        Path(shutil.copytree(tiny_model("llama"), tmp_path / "m")), {"quant_method": "gptq", "bits": 4}
    )
    _with_tensor(folder, "model.layers.0.mlp.up_proj.qweight", torch.zeros(8, 128, dtype=torch.int32))
    with pytest.raises(ModelLoadError, match=r"up_proj\.qweight has no .*up_proj\.qzeros"):
        open_package(folder)
