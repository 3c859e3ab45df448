"""Command R7B (Cohere 2) and GLM-4: what the generic parity tests cannot see.

Cohere 2: a parallel block after one bias-free LayerNorm, interleaved RoPE in the sliding layers only
(the full ones attend without positions), logits multiplied by `logit_scale`. GLM-4: interleaved
RoPE over half the head, four RMSNorms per layer under GLM's names, fused gate_up_proj. Each
switch is shown to matter (ignoring it moves the logits), the layouts follow transformers' config
classes, and the llama.cpp GGUF architectures `cohere2` / `glm4` carry them through.

The `cohere2` and `glm4` kinds also run through every KINDS-parametrized test of test_parity.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import Cohere2Config, Glm4Config
from transformers.models.cohere2 import modeling_cohere2
from transformers.models.glm4 import modeling_glm4

import llmchat
from llmchat.engine.config import from_hf_config, load_hf_config
from llmchat.engine.gguf import GGUFFile
from llmchat.engine.rope import RotaryEmbedding, apply_rotary, cos_sin, inverse_frequencies
from tests.gguf_export import quantized_copy
from tests.hf_reference import hf_greedy, hf_logits, hf_model, llmchat_greedy, random_ids

TOL = 1e-4
NEW_TOKENS = 20
MATTERS = 1e-2  # what ignoring a switch must move the logits by, at least
TinyModelFactory = Callable[..., Path]


pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy(model: Any, prompt: list[int]) -> list[int]:
    return llmchat_greedy(model, prompt, NEW_TOKENS)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- configs ------------------------------------------------------------------------------------

_MINIMAL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 300}


@pytest.mark.parametrize(
    "keys",
    [
        {"num_hidden_layers": 8},
        {"num_hidden_layers": 6, "sliding_window_pattern": 3},
        {"num_hidden_layers": 4, "layer_types": ["full_attention", "sliding_attention"] * 2, "sliding_window": 16},
        {"num_hidden_layers": 4, "sliding_window": None},  # no window: nothing slides, nothing rotates
        {"num_hidden_layers": 4, "num_key_value_heads": 2, "attention_bias": True, "logit_scale": 0.25},
    ],
)
def test_cohere2_layout_follows_the_config_class(keys: dict[str, Any]) -> None:
    """Sliding (and so rotating) layers, window, eps, logit scale, tying, biases: Cohere2Config's."""
    raw = {"architectures": ["Cohere2ForCausalLM"], "model_type": "cohere2", **_MINIMAL, **keys}
    ours = from_hf_config(raw)
    reference = Cohere2Config(**{k: v for k, v in raw.items() if k != "architectures"})
    window = reference.sliding_window
    # Cohere2Attention: a layer has a window, and rotates, when it is a sliding one and a window is set
    slides = tuple(t == "sliding_attention" and window is not None for t in reference.layer_types)
    assert ours.architecture == "cohere2"
    assert tuple(ours.layer_window(i) is not None for i in range(ours.num_layers)) == slides
    assert tuple(ours.uses_rope(i) for i in range(ours.num_layers)) == slides
    assert ours.sliding_window == window
    assert ours.rms_norm_eps == reference.layer_norm_eps
    assert ours.logit_scale == reference.logit_scale
    assert ours.tie_word_embeddings == reference.tie_word_embeddings
    assert ours.max_position_embeddings == reference.max_position_embeddings
    assert ours.head_dim == reference.head_dim
    assert ours.num_kv_heads == reference.num_key_value_heads
    assert ours.qkv_bias == ours.o_bias == reference.attention_bias and not ours.mlp_bias
    assert ours.rope.theta == reference.rope_parameters["rope_theta"]
    assert ours.parallel_block and ours.layer_norm and ours.rope.interleaved and not ours.sandwich_norms


@pytest.mark.parametrize(
    "keys",
    [
        {"num_hidden_layers": 3},
        {"num_hidden_layers": 2, "head_dim": 16, "num_key_value_heads": 4, "partial_rotary_factor": 0.25},
        {
            "num_hidden_layers": 2,
            "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        },
        {"num_hidden_layers": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 4096},
    ],
)
def test_glm4_layout_follows_the_config_class(keys: dict[str, Any]) -> None:
    """head_dim, KV heads, partial rotary (0.5 by default), biases, eps, tying: Glm4Config's."""
    raw = {"architectures": ["Glm4ForCausalLM"], "model_type": "glm4", **_MINIMAL, **keys}
    ours = from_hf_config(raw)
    reference = Glm4Config(**{k: v for k, v in raw.items() if k != "architectures"})
    assert ours.architecture == "glm4"
    assert ours.head_dim == reference.head_dim
    assert ours.num_kv_heads == reference.num_key_value_heads
    assert ours.rope.partial_rotary_factor == reference.rope_parameters["partial_rotary_factor"]
    assert ours.rope.theta == reference.rope_parameters["rope_theta"]
    assert ours.qkv_bias == reference.attention_bias and not ours.o_bias and not ours.mlp_bias
    assert ours.rms_norm_eps == reference.rms_norm_eps
    assert ours.tie_word_embeddings == reference.tie_word_embeddings
    assert ours.max_position_embeddings == reference.max_position_embeddings
    assert ours.eos_token_ids == tuple(reference.eos_token_id)
    assert ours.sliding_window is None and ours.logit_scale is None
    assert ours.sandwich_norms and ours.glm_norm_names and ours.rope.interleaved and not ours.parallel_block


def test_other_families_keep_the_half_split_rope(tiny_model: TinyModelFactory) -> None:
    for kind in ("llama", "phi3", "gemma3"):
        config = load_hf_config(tiny_model(kind))
        assert not config.rope.interleaved and not config.parallel_block and config.logit_scale is None


# --- the interleaved rotation ---------------------------------------------------------------------


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_interleaved_rotation_is_transformers(partial: float) -> None:
    """apply_rotary(interleaved=True) on [heads, tokens, head_dim] is Cohere 2's (whole head) and
    GLM-4's (first half) apply_rotary_pos_emb, for queries and keys alike."""
    from llmchat.engine.config import RopeConfig

    head_dim, tokens = 16, 7
    rope = RopeConfig(theta=10000.0, partial_rotary_factor=partial, interleaved=True)
    inv_freq, _ = inverse_frequencies(rope, head_dim, 128)
    cos, sin = cos_sin(inv_freq, torch.arange(3, 3 + tokens), 1.0, interleaved=True)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, tokens, head_dim, generator=gen), torch.randn(2, tokens, head_dim, generator=gen)
    angles = torch.arange(3, 3 + tokens, dtype=torch.float32)[:, None] * inv_freq[None, :]
    if partial == 1.0:  # Cohere2RotaryEmbedding: repeat_interleave of the angles
        hf_cos, hf_sin = (f(angles.repeat_interleave(2, dim=-1)) for f in (torch.cos, torch.sin))
        expected = modeling_cohere2.apply_rotary_pos_emb(q[None], k[None], hf_cos[None], hf_sin[None])
    else:  # Glm4RotaryEmbedding: cat, then apply_rotary_pos_emb interleaves the first half
        hf_cos, hf_sin = (f(torch.cat((angles, angles), dim=-1)) for f in (torch.cos, torch.sin))
        expected = modeling_glm4.apply_rotary_pos_emb(q[None], k[None], hf_cos[None], hf_sin[None])
    got = apply_rotary(torch.cat((q, k)), cos, sin, interleaved=True)
    torch.testing.assert_close(got, torch.cat((expected[0][0], expected[1][0])), rtol=0, atol=1e-6)
    assert _max_diff(apply_rotary(torch.cat((q, k)), cos, sin), got) > MATTERS  # the half-split is not it


# --- each switch matters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohere2(tiny_model: TinyModelFactory) -> tuple[Any, list[int], torch.Tensor]:
    folder = tiny_model("cohere2")
    model = llmchat.load(folder, device="cpu", dtype="float32")
    ids = random_ids(40, model.config.vocab_size, seed=1)
    return model, ids, hf_logits(hf_model(folder), ids)


@pytest.fixture(scope="module")
def glm4(tiny_model: TinyModelFactory) -> tuple[Any, list[int], torch.Tensor]:
    folder = tiny_model("glm4")
    model = llmchat.load(folder, device="cpu", dtype="float32")
    ids = random_ids(40, model.config.vocab_size, seed=1)
    return model, ids, hf_logits(hf_model(folder), ids)


def _half_split_tables(model: Any) -> None:
    """The model's rotary tables rebuilt for the half-split rotation, its layers told to use it."""
    transformer = model.model
    rope = dataclasses.replace(transformer.config.rope, interleaved=False)
    c = transformer.config
    length = transformer.rotary.length
    transformer.rotary = RotaryEmbedding(rope, c.head_dim, c.max_position_embeddings, length, "cpu", torch.float32)
    for layer in transformer.layers:
        layer.attn.interleaved = False


def test_cohere2_tiny_model_layout(cohere2: tuple[Any, list[int], torch.Tensor]) -> None:
    model, ids, expected = cohere2
    config = model.config
    assert tuple(config.layer_window(i) for i in range(4)) == (8, 8, 8, None)
    assert [layer.attn.rotates for layer in model.model.layers] == [True, True, True, False]
    assert all(layer.mlp_norm is None and layer.parallel for layer in model.model.layers)
    assert config.logit_scale == 0.5 and config.rms_norm_eps == 1e-4 and config.tie_word_embeddings
    assert _max_diff(model.logits(ids), expected) <= TOL


def test_cohere2_ignoring_a_switch_is_visibly_wrong(
    tiny_model: TinyModelFactory, cohere2: tuple[Any, list[int], torch.Tensor]
) -> None:
    """Sequential blocks, the half-split rotation, RoPE on the full layer, an unscaled output, RMSNorm
    for LayerNorm: each moves the logits by far more than the parity tolerance."""
    from llmchat.engine.model import RMSNorm

    _, ids, expected = cohere2
    folder = tiny_model("cohere2")

    def fresh() -> Any:
        return llmchat.load(folder, device="cpu", dtype="float32")

    sequential = fresh()
    for layer in sequential.model.layers:
        layer.parallel, layer.mlp_norm = False, layer.attn_norm  # x += attn(norm(x)); x += mlp(norm(x))
    half_split = fresh()
    _half_split_tables(half_split)
    full_rope = fresh()
    full_rope.model.layers[3].attn.rotates = True
    unscaled = fresh()
    unscaled.model.logit_scale = None
    rms = fresh()
    for module in [*(layer.attn_norm for layer in rms.model.layers), rms.model.norm]:
        module.__class__ = RMSNorm  # same weight and eps, no mean subtracted
    for name, model in [
        ("parallel block", sequential),
        ("interleaving", half_split),
        ("NoPE full layer", full_rope),
        ("logit_scale", unscaled),
        ("LayerNorm", rms),
    ]:
        assert _max_diff(model.logits(ids), expected) > MATTERS, f"ignoring the {name} changes nothing"
    torch.testing.assert_close(unscaled.logits(ids) * 0.5, expected, rtol=0, atol=TOL)  # multiplied, not divided


def test_glm4_tiny_model_layout(glm4: tuple[Any, list[int], torch.Tensor]) -> None:
    model, ids, expected = glm4
    assert model.config.rope.partial_rotary_factor == 0.5 and model.model.rotary.cos.shape[-1] == 16
    layer = model.model.layers[0]
    assert layer.attn_post_norm is not None and layer.mlp_post_norm is not None and layer.mlp_norm is not None
    assert layer.attn.qkv.bias is not None and layer.attn.o.bias is None
    assert _max_diff(model.logits(ids), expected) <= TOL


def test_glm4_ignoring_a_switch_is_visibly_wrong(
    tiny_model: TinyModelFactory, glm4: tuple[Any, list[int], torch.Tensor]
) -> None:
    """The half-split rotation, a whole-head rotation, or the norms mapped the Gemma way (post_attention_layernorm
    after attention) each move the logits by far more than the parity tolerance."""
    _, ids, expected = glm4
    folder = tiny_model("glm4")
    half_split = llmchat.load(folder, device="cpu", dtype="float32")
    _half_split_tables(half_split)
    whole = llmchat.load(folder, device="cpu", dtype="float32")
    c = whole.model.config
    rope = dataclasses.replace(c.rope, partial_rotary_factor=1.0)
    whole.model.rotary = RotaryEmbedding(rope, c.head_dim, c.max_position_embeddings, 64, "cpu", torch.float32)
    swapped = llmchat.load(folder, device="cpu", dtype="float32")
    for layer in swapped.model.layers:
        layer.attn_post_norm, layer.mlp_norm = layer.mlp_norm, layer.attn_post_norm
    for name, model in [("interleaving", half_split), ("partial rotary", whole), ("GLM norm names", swapped)]:
        assert _max_diff(model.logits(ids), expected) > MATTERS, f"ignoring the {name} changes nothing"


# Half precision: transformers' Cohere 2 rotates q/k in float32 (GLM-4 in the model's dtype). Rotating
# in bfloat16 instead moves the bfloat16 logits of the tiny Cohere 2 by about 0.01 on average.
HALF_MEAN_TOL = 1e-3


@pytest.mark.parametrize("kind", ["cohere2", "glm4"])
def test_bfloat16_rounds_like_transformers(kind: str, tiny_model: TinyModelFactory) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_model(kind)
    model = llmchat.load(folder, device="cpu", dtype="bfloat16")
    ids = random_ids(40, model.config.vocab_size, seed=1)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    expected = hf_logits(reference, ids).float()
    assert (model.logits(ids) - expected).abs().mean().item() <= HALF_MEAN_TOL
    if kind == "cohere2":
        for layer in model.model.layers:
            layer.attn.rotate_float32 = False
        assert (model.logits(ids) - expected).abs().mean().item() > HALF_MEAN_TOL


# --- GGUF -------------------------------------------------------------------------------------------


def _as_float32(config: Any) -> Any:
    """The config with what GGUF stores as float32 rounded, and without the EOS list (GGUF has one id)."""
    return config.with_changes(
        rms_norm_eps=float(np.float32(config.rms_norm_eps)),
        logit_scale=None if config.logit_scale is None else float(np.float32(config.logit_scale)),
        eos_token_ids=(),
        dtype=None,
    )


def test_cohere2_gguf_metadata_round_trip(tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]) -> None:
    """general.architecture cohere2 with Cohere2Model's keys: logit scale, LayerNorm epsilon, window;
    llama.cpp's pattern of 4 gives the folder's sliding and NoPE layers. No Q/K permutation."""
    path = tiny_gguf("cohere2")
    file = GGUFFile(path)
    assert file.architecture == "cohere2"
    assert file.metadata["cohere2.logit_scale"] == 0.5
    assert file.metadata["cohere2.attention.layer_norm_epsilon"] == pytest.approx(1e-4)
    assert file.metadata["cohere2.attention.sliding_window"] == 8
    assert file.metadata["cohere2.rope.dimension_count"] == 16
    assert "output.weight" not in file.tensor_info and "blk.0.ffn_norm.weight" not in file.tensor_info
    raw = file.hf_config()
    assert raw["architectures"] == ["Cohere2ForCausalLM"] and raw["tie_word_embeddings"]
    ours, folder = file.model_config(), load_hf_config(tiny_model("cohere2"))
    assert _as_float32(ours) == _as_float32(folder)
    assert ours.rope_layers == (True, True, True, False) and ours.rope.interleaved


@pytest.mark.parametrize(
    ("pattern", "sliding"), [(2, [True, False] * 3), ([1, 1, 0, 1, 1, 0], [True, True, False] * 2)]
)
def test_cohere2_gguf_sliding_window_pattern(pattern: Any, sliding: list[bool], tiny_gguf: Callable[..., Path]) -> None:
    """A file that states `sliding_window_pattern` (a period, or one flag per layer) is read as llama.cpp does."""
    file = GGUFFile(tiny_gguf("cohere2"))
    file.metadata["cohere2.block_count"] = 6
    file.metadata["cohere2.attention.sliding_window_pattern"] = pattern
    raw = file.hf_config()
    assert raw["layer_types"] == ["sliding_attention" if s else "full_attention" for s in sliding]
    config = from_hf_config(raw)
    assert list(config.rope_layers) == sliding


def test_glm4_gguf_metadata_round_trip(tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]) -> None:
    """general.architecture glm4: rope.dimension_count is the rotary half, gate|up stays fused in
    ffn_up, the norms are ffn_norm / post_attention_norm / post_ffw_norm, q/k/v keep their biases."""
    path = tiny_gguf("glm4")
    file = GGUFFile(path)
    assert file.architecture == "glm4"
    assert file.metadata["glm4.rope.dimension_count"] == 16
    names = set(file.tensor_info)
    assert {"blk.0.ffn_up.weight", "blk.0.ffn_norm.weight", "blk.0.post_attention_norm.weight"} <= names
    assert {"blk.0.post_ffw_norm.weight", "blk.0.attn_q.bias", "output.weight"} <= names
    assert "blk.0.ffn_gate.weight" not in names and "blk.0.attn_output.bias" not in names
    assert file.tensor_info["blk.0.ffn_up.weight"].shape == (256, 64)
    ours, folder = file.model_config(), load_hf_config(tiny_model("glm4"))
    assert _as_float32(ours) == _as_float32(folder)
    file.metadata["glm4.rope.dimension_count"] = 32  # a whole-head rotary must not fall back to GLM's 0.5
    assert file.model_config().rope.partial_rotary_factor == 1.0


@pytest.mark.parametrize("kind", ["cohere2", "glm4"])
def test_f32_gguf_gives_the_folders_logits_and_tokens(
    kind: str, tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]
) -> None:
    folder = tiny_model(kind)
    ours = llmchat.load(tiny_gguf(kind), device="cpu", dtype="float32")
    reference = llmchat.load(folder, device="cpu", dtype="float32")
    ids = random_ids(40, reference.config.vocab_size, seed=0)
    assert _max_diff(ours.logits(ids), reference.logits(ids)) <= TOL
    assert _max_diff(ours.logits(ids), hf_logits(hf_model(folder), ids)) <= TOL
    prompt = ids[:12]
    assert _greedy(ours, prompt) == _greedy(reference, prompt) == hf_greedy(hf_model(folder), prompt, NEW_TOKENS)


@pytest.mark.parametrize(
    ("kind", "qtype"), [("cohere2", Q.Q8_0), ("cohere2", Q.Q4_0), ("glm4", Q.Q8_0), ("glm4", Q.Q4_1)]
)
def test_quantized_gguf_is_the_folder_with_quantized_weights(
    kind: str, qtype: Q, tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    """Dequantized at load, the file is the folder with its matrices quantized; kept packed (the
    default on CPU), it stays close to that and greedy follows its own logits."""
    path = tiny_gguf(kind, qtype)
    reference = llmchat.load(quantized_copy(tiny_model(kind), tmp_path / "rt", qtype), device="cpu", dtype="float32")
    plain = llmchat.load(path, device="cpu", dtype="float32", packed=False)
    ids = random_ids(40, reference.config.vocab_size, seed=0)
    expected = reference.logits(ids)
    assert _max_diff(plain.logits(ids), expected) <= TOL
    packed = llmchat.load(path, device="cpu", dtype="float32")
    assert qtype.name in packed.info.packing and packed.weights_bytes() < plain.weights_bytes()
    got = packed.logits(ids)
    error = (got - expected).abs()
    assert error.max().item() < 0.06 * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9
    prompt = ids[:8]
    tokens = _greedy(packed, prompt)[:8]
    assert (packed.logits(prompt + tokens)[len(prompt) - 1 : -1].argmax(-1) == torch.tensor(tokens)).all()


def test_tiny_configs_are_what_the_tests_claim(tiny_model: TinyModelFactory) -> None:
    """The folders carry the values the tests above rely on (old style: sliding_window_pattern, a
    top-level partial_rotary_factor)."""
    old_cohere = json.loads((tiny_model("cohere2", "old") / "config.json").read_text())
    assert old_cohere["sliding_window_pattern"] == 4 and "layer_types" not in old_cohere
    old_glm = json.loads((tiny_model("glm4", "old") / "config.json").read_text())
    assert old_glm["partial_rotary_factor"] == 0.5 and "rope_parameters" not in old_glm
