"""OLMo 2 and EXAONE 4: norms after each branch instead of before it (ModelConfig.norm_after), OLMo 2's
q/k norms over the whole projection, EXAONE 4's per-head q/k norms, its sliding layers
(`layer_types` / `sliding_window_pattern`) and its global layers without RoPE; the llama.cpp GGUF
architectures `olmo2` and `exaone4`.

The `olmo2` and `exaone4` kinds also run through every KINDS-parametrized test of test_parity.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Exaone4Config

import llmchat
from llmchat.engine.checkpoint import NAMES_BY_LAYOUT, internal_name
from llmchat.engine.config import from_hf_config, load_hf_config
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.gguf import GGUFFile
from llmchat.engine.package import open_package
from tests.gguf_export import quantized_copy
from tests.hf_reference import hf_greedy, hf_logits, hf_model, llmchat_greedy, random_ids

TOL = 1e-4
NEW_TOKENS = 20
KINDS = ("olmo2", "exaone4")
TinyModelFactory = Callable[..., Path]


pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy(model: Any, prompt: list[int]) -> list[int]:
    return llmchat_greedy(model, prompt, NEW_TOKENS)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- config.json: the config classes' defaults and layouts ------------------------------------------

_MINIMAL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 300}


@pytest.mark.parametrize("model_type", KINDS)
def test_absent_keys_take_the_config_classes_defaults(model_type: str) -> None:
    raw = {"model_type": model_type, "num_hidden_layers": 8, **_MINIMAL}
    ours = from_hf_config(raw)
    reference = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    assert ours.architecture == model_type and ours.norm_after and ours.qk_norm
    assert ours.qk_norm_whole == (model_type == "olmo2")  # OLMo 2 over q_size / kv_size, EXAONE 4 per head
    assert ours.rms_norm_eps == reference.rms_norm_eps == 1e-5
    assert ours.max_position_embeddings == reference.max_position_embeddings
    assert ours.tie_word_embeddings == reference.tie_word_embeddings
    assert ours.rope.theta == reference.rope_parameters["rope_theta"]
    assert ours.head_dim == reference.hidden_size // reference.num_attention_heads
    assert not (ours.qkv_bias or ours.o_bias or ours.mlp_bias or ours.sandwich_norms)
    if model_type == "exaone4":  # window 4096, every 4th layer global
        assert ours.sliding_window == reference.sliding_window == 4096
        assert reference.sliding_window_pattern == 4
        slides = tuple(t == "sliding_attention" for t in reference.layer_types)
        assert ours.sliding_layers == slides == (True, True, True, False) * 2
    else:
        assert ours.sliding_window is None and not any(ours.sliding_layers) and ours.rope_layers == ()


def test_olmo2_attention_bias_covers_q_k_v_and_o() -> None:
    """Olmo2Attention gives q, k, v and o_proj a bias when attention_bias is set; EXAONE 4 never has one."""
    raw = {"num_hidden_layers": 2, "attention_bias": True, **_MINIMAL}
    olmo2, exaone4 = from_hf_config({"model_type": "olmo2", **raw}), from_hf_config({"model_type": "exaone4", **raw})
    assert olmo2.qkv_bias and olmo2.o_bias and not olmo2.mlp_bias
    assert not (exaone4.qkv_bias or exaone4.o_bias)


@pytest.mark.parametrize(
    "keys",
    [
        {"num_hidden_layers": 8},
        {"num_hidden_layers": 6, "sliding_window_pattern": 2},
        {"num_hidden_layers": 5, "sliding_window_pattern": 3, "sliding_window": 16},
        {"num_hidden_layers": 4, "sliding_window_pattern": 1},  # every layer global: none rotates
        {"num_hidden_layers": 4, "layer_types": ["full_attention", "sliding_attention"] * 2},
        {"num_hidden_layers": 4, "sliding_window": None, "layer_types": ["full_attention"] * 4},  # 1.2B
    ],
)
def test_exaone4_window_and_rope_layers_follow_transformers(keys: dict[str, Any]) -> None:
    """Sliding layers are Exaone4Config's layer_types; a layer rotates where Exaone4Attention does:
    `sliding_window is None or is_sliding` (with a window, the global layers use no positions)."""
    raw = {"model_type": "exaone4", **_MINIMAL, **keys}
    ours = from_hf_config(raw)
    reference = Exaone4Config(**{k: v for k, v in raw.items() if k != "model_type"})
    slides = tuple(t == "sliding_attention" for t in reference.layer_types)
    windowed = reference.sliding_window is not None
    assert tuple(ours.layer_window(i) is not None for i in range(ours.num_layers)) == tuple(
        s and windowed for s in slides
    )
    if any(slides) and windowed:
        assert ours.sliding_window == reference.sliding_window
    rotates = tuple(not windowed or s for s in slides)
    assert tuple(ours.uses_rope(i) for i in range(ours.num_layers)) == rotates


def test_exaone4_string_pattern_repeats_with_the_last_layer_global() -> None:
    """ "LLLG" (EXAONE 4.0 32B's config) as Exaone4Config's docstring defines it; transformers itself
    cannot expand a string, so published configs list layer_types as well."""
    raw = {"model_type": "exaone4", **_MINIMAL, "num_hidden_layers": 7, "sliding_window_pattern": "LLLG"}
    ours = from_hf_config(raw)
    assert ours.sliding_layers == (True, True, True, False, True, True, False)
    assert tuple(ours.uses_rope(i) for i in range(7)) == ours.sliding_layers
    with_types = from_hf_config({**raw, "layer_types": ["sliding_attention"] * 6 + ["full_attention"]})
    assert with_types.sliding_layers == (True,) * 6 + (False,)  # layer_types win over the pattern


@pytest.mark.parametrize("pattern", ["LLXG", -1, 2.5, True])
def test_exaone4_unreadable_pattern_is_one_line_error(pattern: Any) -> None:
    raw = {"model_type": "exaone4", **_MINIMAL, "num_hidden_layers": 4, "sliding_window_pattern": pattern}
    with pytest.raises(ModelLoadError, match="sliding_window_pattern"):
        from_hf_config(raw)


def test_checkpoint_names_follow_the_layout() -> None:
    """With norm_after, post_attention_layernorm norms the attention's output (in pre-norm models it
    is the MLP's input norm), and an input_layernorm has nowhere to go."""
    layer = "model.layers.2."
    assert internal_name(layer + "post_attention_layernorm.weight", False) == ("layers.2.mlp_norm.weight", None)
    names = {
        part: internal_name(layer + part, False, NAMES_BY_LAYOUT["norm_after"])
        for part in ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight", "input_layernorm.weight")
    }
    assert names["post_attention_layernorm.weight"] == ("layers.2.attn_post_norm.weight", None)
    assert names["post_feedforward_layernorm.weight"] == ("layers.2.mlp_post_norm.weight", None)
    assert names["input_layernorm.weight"] == ("layers.2.attn_norm.weight", None)  # then refused: see below


def test_a_pre_norm_checkpoint_does_not_load_as_olmo2(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_model("olmo2"), tmp_path / "olmo2")
    (path,) = folder.glob("*.safetensors")
    tensors = load_file(str(path))
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="input_layernorm"):
        llmchat.load(folder, device="cpu", dtype="float32")


# --- the tiny models: the switches are exercised ---------------------------------------------------


def _as_pre_norm(model: Any) -> None:
    """Move every layer's norms in front of their branches (what ignoring norm_after would compute)."""
    for block in model.model.layers:
        block.attn_norm, block.attn_post_norm = block.attn_post_norm, None
        block.mlp_norm, block.mlp_post_norm = block.mlp_post_norm, None


@pytest.mark.parametrize("kind", KINDS)
def test_norms_after_each_branch_are_what_matches(kind: str, tiny_model: TinyModelFactory) -> None:
    folder = tiny_model(kind)
    model = llmchat.load(folder, device="cpu", dtype="float32")
    assert model.config.norm_after
    for block in model.model.layers:
        assert isinstance(block.attn_norm, torch.nn.Identity) and isinstance(block.mlp_norm, torch.nn.Identity)
        assert block.attn_post_norm is not None and block.mlp_post_norm is not None
    ids = random_ids(40, model.config.vocab_size, seed=1)
    expected = hf_logits(hf_model(folder), ids)
    assert _diff(model.logits(ids), expected) <= TOL
    _as_pre_norm(model)  # the same weights in the pre-norm layout must be visibly wrong
    assert _diff(model.logits(ids), expected) > 1e-2


def test_olmo2_qk_norms_span_the_whole_projection(tiny_model: TinyModelFactory) -> None:
    model = llmchat.load(tiny_model("olmo2"), device="cpu", dtype="float32")
    c = model.config
    for block in model.model.layers:
        assert block.attn.q_norm.weight.shape == (c.q_size,) and block.attn.k_norm.weight.shape == (c.kv_size,)
    assert c.num_kv_heads < c.num_heads  # GQA: the k norm is narrower than the q norm


def test_exaone4_global_layer_attends_without_positions(tiny_model: TinyModelFactory) -> None:
    """Layer 2 is global and rotates nothing; rotating it as well must be visibly wrong."""
    folder = tiny_model("exaone4")
    config = load_hf_config(folder)
    assert config.sliding_layers == (True, True, False, True)
    assert tuple(config.layer_window(i) for i in range(4)) == (8, 8, None, 8)
    model = llmchat.load(folder, device="cpu", dtype="float32")
    assert [block.attn.rotates for block in model.model.layers] == [True, True, False, True]
    assert model.model.layers[0].attn.q_norm.weight.shape == (config.head_dim,)  # per head
    ids = random_ids(40, config.vocab_size, seed=1)
    expected = hf_logits(hf_model(folder), ids)
    assert _diff(model.logits(ids), expected) <= TOL
    model.model.layers[2].attn.rotates = True
    assert _diff(model.logits(ids), expected) > 1e-2


def test_exaone4_long_decode_past_the_window_matches_transformers(tiny_model: TinyModelFactory) -> None:
    """A 30-token prompt and 20 greedy tokens: the sliding layers' ring wraps while decoding."""
    folder = tiny_model("exaone4")
    model = llmchat.load(folder, device="cpu", dtype="float32", context_length=64)
    prompt = random_ids(30, model.config.vocab_size, seed=3)
    assert _greedy(model, prompt) == hf_greedy(hf_model(folder), prompt, NEW_TOKENS)


# --- GGUF: llama.cpp's olmo2 and exaone4 ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_metadata_round_trip(kind: str, tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]) -> None:
    """The file's metadata becomes the folder's config (values GGUF keeps as float32 rounded alike)."""
    file = GGUFFile(tiny_gguf(kind))
    assert file.architecture == kind
    raw = file.hf_config()
    assert raw["architectures"] == [{"olmo2": "Olmo2ForCausalLM", "exaone4": "Exaone4ForCausalLM"}[kind]]
    folder = load_hf_config(tiny_model(kind))
    ours = file.model_config()
    if kind == "exaone4":
        assert raw["sliding_window"] == 8
        assert raw["layer_types"] == ["sliding_attention"] * 2 + ["full_attention", "sliding_attention"]
        assert ours.rope_layers == folder.rope_layers == (True, True, False, True)
    same = {"rms_norm_eps": float(np.float32(folder.rms_norm_eps)), "eos_token_ids": (), "dtype": None}
    assert ours.with_changes(eos_token_ids=(), dtype=None) == folder.with_changes(**same)


def _gguf_writer(path: Path, arch: str, layers: int, **keys: Any) -> Path:
    """A weightless GGUF of `arch` with the shape keys and `keys` (name -> value) under the arch prefix."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_context_length(4096)
    writer.add_layer_norm_rms_eps(1e-5)
    for name, value in keys.items():
        if name == "sliding_window":
            writer.add_sliding_window(value)
        elif name == "sliding_window_pattern":
            writer.add_sliding_window_pattern(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_exaone4_gguf_without_a_pattern_follows_llama_cpp(tmp_path: Path) -> None:
    """llama.cpp's exaone4: without the per-layer list only a 64-layer model (EXAONE 4.0 32B) slides,
    every 4th layer global, over 4096 tokens unless the file says otherwise; other models have no
    window and every layer rotates."""
    big = GGUFFile(_gguf_writer(tmp_path / "32b.gguf", "exaone4", 64)).model_config()
    assert big.sliding_window == 4096 and big.sliding_layers == (True, True, True, False) * 16
    assert tuple(big.uses_rope(i) for i in range(64)) == big.sliding_layers
    window = GGUFFile(_gguf_writer(tmp_path / "w.gguf", "exaone4", 64, sliding_window=2048)).model_config()
    assert window.sliding_window == 2048 and window.sliding_layers == big.sliding_layers
    small = GGUFFile(_gguf_writer(tmp_path / "1.2b.gguf", "exaone4", 30, sliding_window=4096)).model_config()
    assert small.sliding_window is None and not any(small.sliding_layers)
    assert all(small.uses_rope(i) for i in range(30))
    listed = _gguf_writer(
        tmp_path / "l.gguf", "exaone4", 3, sliding_window=16, sliding_window_pattern=[True, False, True]
    )
    config = GGUFFile(listed).model_config()
    assert config.sliding_layers == (True, False, True) and config.rope_layers == (True, False, True)
    short = _gguf_writer(tmp_path / "s.gguf", "exaone4", 3, sliding_window=16, sliding_window_pattern=[True, False])
    with pytest.raises(ModelLoadError, match="2 entries for 3 layers"):
        GGUFFile(short).model_config()


def test_olmo2_gguf_with_a_window_is_refused(tmp_path: Path) -> None:
    """convert_hf_to_gguf.py writes OLMo 3 (sliding layers) as olmo2 too: not OLMo 2's layout."""
    path = _gguf_writer(tmp_path / "olmo3.gguf", "olmo2", 4, sliding_window=4096)
    with pytest.raises(ModelLoadError, match="OLMo 3"):
        GGUFFile(path).model_config()


@pytest.mark.parametrize("kind", KINDS)
def test_f32_gguf_gives_the_folders_logits_and_tokens(
    kind: str, tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]
) -> None:
    folder = tiny_model(kind)
    ours = llmchat.load(tiny_gguf(kind), device="cpu", dtype="float32")
    reference = llmchat.load(folder, device="cpu", dtype="float32")
    ids = random_ids(40, reference.config.vocab_size, seed=0)
    assert _diff(ours.logits(ids), reference.logits(ids)) <= TOL
    assert _diff(ours.logits(ids), hf_logits(hf_model(folder), ids)) <= TOL
    prompt = ids[:12]
    assert _greedy(ours, prompt) == _greedy(reference, prompt) == hf_greedy(hf_model(folder), prompt, NEW_TOKENS)


@pytest.mark.parametrize("kind", KINDS)
def test_q8_0_gguf_is_the_folder_with_quantized_weights(
    kind: str, tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    """Dequantized (packed=False), a Q8_0 file is exactly transformers' model of the same rounded matrices."""
    folder = quantized_copy(tiny_model(kind), tmp_path / kind, Q.Q8_0)
    ours = llmchat.load(tiny_gguf(kind, Q.Q8_0), device="cpu", dtype="float32", packed=False)
    ids = random_ids(40, ours.config.vocab_size, seed=0)
    assert _diff(ours.logits(ids), hf_logits(hf_model(folder), ids)) <= TOL
    plain = llmchat.load(tiny_model(kind), device="cpu", dtype="float32")
    assert _diff(plain.logits(ids), ours.logits(ids)) > 1e-3, "the weights were not quantized"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("qtype", "layout"), [(Q.Q4_0, "int4"), (Q.Q8_0, "int8")])
def test_quantized_gguf_stays_packed(kind: str, qtype: Q, layout: str, tiny_gguf: Callable[..., Path]) -> None:
    """Every quantized projection is packed and the model follows the same file dequantized."""
    from llmchat.engine.checkpoint import packing_plan
    from llmchat.engine.packed import PackedLinear

    path = tiny_gguf(kind, qtype)
    packed = llmchat.load(path, device="cpu", dtype="float32")
    plain = llmchat.load(path, device="cpu", dtype="float32", packed=False)
    assert f"{qtype.name} → {layout}" in packed.info.packing
    plan = packing_plan(open_package(path).weights.quantized_types(), plain.config)
    names = {n + ".weight" for n, m in packed.model.named_modules() if isinstance(m, PackedLinear)}
    assert names == set(plan) and any(".attn.qkv." in n for n in names) and any(".mlp.down." in n for n in names)
    ids = random_ids(40, plain.config.vocab_size, seed=0)
    ours, reference = packed.logits(ids), plain.logits(ids)
    error = (ours - reference).abs()
    assert error.max().item() < 0.06 * reference.abs().max().item()
    assert error.mean().item() < 0.01 * reference.abs().max().item()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.9


# --- half precision ----------------------------------------------------------------------------------
# Olmo2RMSNorm multiplies by its weight in float32 before rounding (Llama rounds first), and
# Olmo2RotaryEmbedding keeps cos/sin in float32, so q/k rotate in float32; EXAONE 4 rounds like Llama.
# Done the other way, OLMo 2's bfloat16 logits move by about 0.03 on average.
HALF_MEAN_TOL = 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_rounds_like_transformers(kind: str, tiny_model: TinyModelFactory) -> None:
    from transformers import AutoModelForCausalLM

    from llmchat.engine.rope import RotaryEmbedding

    folder = tiny_model(kind)
    model = llmchat.load(folder, device="cpu", dtype="bfloat16")
    ids = random_ids(40, model.config.vocab_size, seed=1)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    expected = hf_logits(reference, ids).float()
    assert (model.logits(ids).float() - expected).abs().mean().item() <= HALF_MEAN_TOL
    if kind == "olmo2":  # cos/sin rounded to bfloat16 instead must show
        assert model.model.rotary is not None and model.model.rotary.cos.dtype == torch.float32
        c = model.config
        model.model.rotary = RotaryEmbedding(
            c.rope, c.head_dim, c.max_position_embeddings, 64, model.model.device, torch.bfloat16
        )
        assert (model.logits(ids).float() - expected).abs().mean().item() > HALF_MEAN_TOL
