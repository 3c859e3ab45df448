"""Hybrid models: recurrent layers between attention layers, and the fixed state they keep.

LFM2 (gated short convolutions in layers 0, 2, 3, attention in layer 1), Qwen3.5 (Gated DeltaNet
in layers 0 and 2, gated attention in layers 1 and 3) and Granite 4 (Mamba-2 layers, with and without
experts; tests/test_granite4.py) run through every KINDS test of test_parity.py
(logits, greedy tokens, both config styles, prefix reuse, parameter count). Here: each config
class's layout rules, the GGUF twins (llama.cpp's `lfm2`: head_count_kv 0 marks a convolution layer;
`qwen35`: its rewrites of the DeltaNet tensors undone), DeltaNet's chunked prefill over several
chunks, and what a fixed recurrent state changes in
the cache: only attention layers hold keys and values, the recurrent states cannot be truncated, so
regenerating, branching at a token, rewinding and re-reading an earlier step go through snapshots
and must give what a fresh model gives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Lfm2Config
from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

import llmchat
from llmchat.engine.config import from_hf_config
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.events import PrefillDone, TokenEvent
from llmchat.engine.gguf import GGUFFile
from llmchat.engine.memory import kv_bytes_per_token, kv_cache_bytes, recurrent_state_bytes
from llmchat.engine.model import Attention
from llmchat.engine.short_conv import ShortConv
from tests.hf_reference import hf_logits, hf_model, random_ids, vocab_size

TOL = 1e-4
TinyModelFactory = Callable[..., Path]
GREEDY = llmchat.SamplingParams(temperature=0)
HYBRID_KINDS = ("lfm2", "qwen3_5", "granite4", "granite4-dense")


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model: Any, prompt: list[int], n: int = 8, **kwargs: Any) -> tuple[list[int], PrefillDone]:
    events = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=n, stop_on_eos=False, **kwargs))
    (done,) = [e for e in events if isinstance(e, PrefillDone)]
    return [e.token_id for e in events if isinstance(e, TokenEvent)], done


_MINIMAL = {
    "architectures": ["Lfm2ForCausalLM"],
    "model_type": "lfm2",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 5,
    "vocab_size": 300,
}


@pytest.mark.parametrize(
    "keys",
    [
        {"intermediate_size": 960, "layer_types": ["conv", "full_attention", "conv", "conv", "full_attention"]},
        {"intermediate_size": 960, "full_attn_idxs": [2, 4]},
        {"intermediate_size": 960},  # neither: every layer attends
        {"block_ff_dim": 960, "block_multiple_of": 64, "block_ffn_dim_multiplier": 1.5, "full_attn_idxs": [0]},
        {"intermediate_size": 200, "block_auto_adjust_ff_dim": False, "full_attn_idxs": [1, 3]},
    ],
)
def test_layout_and_mlp_width_follow_the_config_class(keys: dict[str, Any]) -> None:
    """Which layers convolve and how wide the MLP is are Lfm2Config's (and Lfm2MLP's) answers."""
    raw = {**_MINIMAL, **keys}
    reference = Lfm2Config(**{k: v for k, v in raw.items() if k != "architectures"})
    config = from_hf_config(raw)
    assert [("attention" if t == "full_attention" else t) for t in reference.layer_types] == list(config.layer_kinds)
    assert config.intermediate_size == Lfm2MLP(reference).w1.out_features
    assert config.conv_kernel == reference.conv_L_cache == 3
    assert config.rope.theta == 1_000_000.0 and config.tie_word_embeddings


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"layer_types": ["conv", "mamba", "conv", "conv", "conv"]}, "unsupported layer type.*'mamba'"),
        ({"layer_types": ["conv", "full_attention"]}, "layer_types has 2 entries for 5 layers"),
        ({"conv_L_cache": 0}, "conv_L_cache must be at least 1"),
    ],
)
def test_bad_layouts_are_refused_in_one_line(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as error:
        from_hf_config({**_MINIMAL, "intermediate_size": 960, "full_attn_idxs": [1], **keys})
    assert "\n" not in str(error.value)


def test_convolution_layers_keep_a_fixed_state_and_no_keys(tiny_model: TinyModelFactory) -> None:
    """Layers 0, 2, 3 convolve, layer 1 attends: the cache holds keys and values for one layer and a
    [kernel - 1, hidden] state for each of the others, and the memory math says the same."""
    model = llmchat.load(tiny_model("lfm2"), device="cpu", dtype="float32")
    mixers = [type(block.mixer) for block in model.model.layers]
    assert mixers == [ShortConv, Attention, ShortConv, ShortConv]
    cache, config = model.cache, model.config
    assert cache.recurrent_layers == [0, 2, 3]
    assert all(tuple(t.shape for t in cache.state(i)) == ((2, 64),) for i in (0, 2, 3))
    assert cache.keys.shape[0] + cache.ring_keys.shape[0] == 1
    assert cache.bytes_per_token == kv_bytes_per_token(config, torch.float32) == 2 * 2 * 16 * 4
    assert cache.state_bytes == recurrent_state_bytes(config, torch.float32) == 3 * 2 * 64 * 4
    assert cache.nbytes == kv_cache_bytes(config, torch.float32, cache.capacity)  # no snapshots yet
    tokens, _ = _run(model, random_ids(10, config.vocab_size, seed=1), 4)
    assert cache.used_bytes == cache.length * cache.bytes_per_token + cache.state_bytes + cache.snapshot_bytes
    assert cache.snapshots == [9]  # where the prompt's last token starts


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_the_state_is_really_used(kind: str, tiny_model: TinyModelFactory) -> None:
    """Self-check: the convolution reaches back across positions (zeroing the state between two
    prefill chunks changes the logits), so the parity tests exercise the state."""
    folder = tiny_model(kind)
    ids = random_ids(20, vocab_size(folder), seed=2)
    reference = hf_logits(hf_model(folder), ids)
    model = llmchat.load(folder, device="cpu", dtype="float32", prefill_chunk=7)
    chunked = model.logits(ids)
    assert (chunked - reference).abs().max().item() <= TOL  # three chunks, states carried over
    model.cache.truncate(0)
    list(model.generate(ids[:7], sampling=GREEDY, max_new_tokens=1))
    for layer in model.cache.recurrent_layers:
        for state in model.cache.state(layer):
            state.zero_()
    logits = model.model(torch.tensor(ids[7:]), model.cache, 7)
    assert (logits - reference[7:]).abs().max().item() > 0.01


def test_gguf_twin_gives_the_folders_logits_config_and_tokens(
    tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]
) -> None:
    folder, path = tiny_model("lfm2"), tiny_gguf("lfm2")
    raw = GGUFFile(path).hf_config()
    assert raw["layer_types"] == ["conv", "full_attention", "conv", "conv"]
    assert raw["num_key_value_heads"] == 2 and raw["conv_L_cache"] == 3 and raw["intermediate_size"] == 128
    ours, theirs = (llmchat.load(p, device="cpu", dtype="float32") for p in (path, folder))
    fields = ("layer_kinds", "conv_kernel", "intermediate_size", "num_kv_heads", "tie_word_embeddings", "qk_norm")
    assert all(getattr(ours.config, f) == getattr(theirs.config, f) for f in fields)
    ids = random_ids(40, ours.config.vocab_size, seed=1)
    diff = (ours.logits(ids) - theirs.logits(ids)).abs().max().item()
    assert diff <= TOL, f"GGUF logits differ from the folder's by {diff:.2e}"
    assert _run(ours, ids[:12], 20)[0] == _run(theirs, ids[:12], 20)[0]


def test_quantized_gguf_packs_the_convolution_projections(tiny_gguf: Callable[..., Path]) -> None:
    """Q8_0: the short convolutions' in/out projections are packed like attention's; the filters stay float."""
    path = tiny_gguf("lfm2", "Q8_0")
    packed = llmchat.load(path, device="cpu", dtype="float32")
    plain = llmchat.load(path, device="cpu", dtype="float32", packed=False)
    assert {"layers.0.conv.in_proj.weight", "layers.0.conv.out_proj.weight"} <= set(packed.info.plan)
    assert "layers.1.attn.qkv.weight" in packed.info.plan
    assert packed.model.layers[0].conv.weight.dtype == torch.float32
    ids = random_ids(40, packed.config.vocab_size, seed=1)
    ours, reference = packed.logits(ids), plain.logits(ids)
    assert (ours - reference).abs().max().item() < 0.05 * reference.abs().max().item()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_regenerating_resumes_from_the_snapshot(kind: str, tiny_model: TinyModelFactory) -> None:
    """The same prompt again reuses all but its last token (the snapshot there) and answers the same."""
    model = llmchat.load(tiny_model(kind), device="cpu", dtype="float32")
    prompt = random_ids(12, model.config.vocab_size, seed=3)
    first, _ = _run(model, prompt)
    again, done = _run(model, prompt)
    assert again == first and done.reused_tokens == len(prompt) - 1 and done.prefilled_tokens == 1


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_branching_and_rewinding_recompute_from_the_nearest_snapshot(kind: str, tiny_model: TinyModelFactory) -> None:
    """A branch at answer token 3 (the cache holds the answer, whose states are gone) resumes from the
    prompt's snapshot; a prompt sharing only part of the cached one has no snapshot within it and
    starts over. Each gives what a fresh model gives."""
    folder = tiny_model(kind)
    model = llmchat.load(folder, device="cpu", dtype="float32")
    vocab = model.config.vocab_size
    prompt = random_ids(12, vocab, seed=3)
    answer, _ = _run(model, prompt)
    branch = [*answer[:3], (answer[3] + 1) % vocab]
    tokens, done = _run(model, prompt, answer_prefix=branch)
    fresh = llmchat.load(folder, device="cpu", dtype="float32")
    assert tokens == _run(fresh, prompt, answer_prefix=branch)[0]
    assert done.reused_tokens == len(prompt) - 1  # the snapshot; the branch's tokens are recomputed

    partial = prompt[:6] + random_ids(5, vocab, seed=9)
    tokens, done = _run(model, partial)
    assert done.reused_tokens == 0 and tokens == _run(fresh, partial)[0]


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_every_step_of_an_answer_can_be_reread_and_the_cache_is_left_alone(
    kind: str, tiny_model: TinyModelFactory
) -> None:
    """step_logits of any step (the inspector) re-runs from the snapshot before it: the logits are a
    fresh forward pass's, and the next turn still reuses the cache and answers like a fresh model."""
    folder = tiny_model(kind)
    model = llmchat.load(folder, device="cpu", dtype="float32")
    prompt = random_ids(12, model.config.vocab_size, seed=5)
    answer, _ = _run(model, prompt, 8)
    states = {layer: [t.clone() for t in model.cache.state(layer)] for layer in model.cache.recurrent_layers}
    tokens = list(model.cache.tokens)
    for i in range(len(answer)):
        logits = model.generator.step_logits(prompt + answer[:i])
        assert int(logits.argmax()) == answer[i]
        assert torch.allclose(logits, model.logits(prompt + answer[:i])[-1], atol=TOL)
    assert model.cache.tokens == tokens
    for layer, kept in states.items():
        assert all(torch.equal(now, then) for now, then in zip(model.cache.state(layer), kept, strict=True))
    follow_up = prompt + answer + random_ids(4, model.config.vocab_size, seed=6)
    tokens_next, done = _run(model, follow_up, 6)
    assert done.reused_tokens == len(prompt) + len(answer) - 1
    assert tokens_next == _run(llmchat.load(folder, device="cpu", dtype="float32"), follow_up, 6)[0]


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_long_answers_keep_snapshots_along_the_way(kind: str, tiny_model: TinyModelFactory) -> None:
    from llmchat.engine.generate import SNAPSHOT_EVERY
    from llmchat.engine.kv_cache import MAX_SNAPSHOTS

    model = llmchat.load(tiny_model(kind), device="cpu", dtype="float32")
    prompt = random_ids(10, model.config.vocab_size, seed=7)
    _run(model, prompt, SNAPSHOT_EVERY + 2)
    assert model.cache.snapshots == [len(prompt) - 1, SNAPSHOT_EVERY]
    assert model.cache.snapshot_bytes == 2 * model.cache.state_bytes
    for _ in range(MAX_SNAPSHOTS + 2):
        model.cache.take_snapshot()
        model.cache.append_tokens([1])
    assert len(model.cache.snapshots) == MAX_SNAPSHOTS


def test_info_tells_the_layer_kinds_and_the_fixed_state(tiny_model: TinyModelFactory) -> None:
    folder = tiny_model("lfm2")
    run = [sys.executable, "-m", "llmchat", "info", str(folder)]
    data = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    assert data["layer_kinds"] == ["conv", "attention", "conv", "conv"]
    assert data["recurrent_state_bytes"] == 3 * 2 * 64 * 4 and data["kv_bytes_per_token"] == 2 * 2 * 16 * 4
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "1 attention layers keep keys and values" in text and "3 short-convolution (kernel 3) layers" in text


_QWEN3_5 = {
    "architectures": ["Qwen3_5ForCausalLM"],
    "model_type": "qwen3_5_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
}


@pytest.mark.parametrize(
    "keys",
    [
        {"num_hidden_layers": 8},  # every 4th layer attends (full_attention_interval's default)
        {"num_hidden_layers": 6, "full_attention_interval": 3, "linear_num_key_heads": 2, "linear_num_value_heads": 6},
        {"num_hidden_layers": 3, "layer_types": ["full_attention", "linear_attention", "full_attention"]},
    ],
)
def test_qwen3_5_layout_follows_the_config_class(keys: dict[str, Any]) -> None:
    from transformers import Qwen3_5TextConfig

    raw = {**_QWEN3_5, **keys}
    reference = Qwen3_5TextConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    config = from_hf_config(raw)
    kinds = [("attention" if t == "full_attention" else t) for t in reference.layer_types]
    assert list(config.layer_kinds) == kinds
    assert (config.linear_key_heads, config.linear_value_heads) == (
        reference.linear_num_key_heads,
        reference.linear_num_value_heads,
    )
    assert (config.linear_key_dim, config.linear_value_dim, config.conv_kernel) == (128, 128, 4)
    assert config.head_dim == 256 and config.rope.partial_rotary_factor == 0.25
    assert config.norm_offset == 1.0 and config.attn_output_gate and config.qk_norm


def test_qwen3_5_refuses_value_heads_that_do_not_group() -> None:
    with pytest.raises(ModelLoadError, match="6 linear value heads are not a multiple of 4 key heads"):
        from_hf_config({**_QWEN3_5, "num_hidden_layers": 4, "linear_num_key_heads": 4, "linear_num_value_heads": 6})


def test_deltanet_layers_keep_a_convolution_window_and_a_float32_matrix_per_value_head(
    tiny_model: TinyModelFactory,
) -> None:
    model = llmchat.load(tiny_model("qwen3_5"), device="cpu", dtype="float32")
    from llmchat.engine.delta_net import GatedDeltaNet

    assert [type(block.mixer) for block in model.model.layers] == [
        GatedDeltaNet,
        Attention,
        GatedDeltaNet,
        Attention,
    ]
    cache = model.cache
    assert cache.recurrent_layers == [0, 2]
    conv, matrices = cache.state(0)
    assert conv.shape == (3, 2 * 4 * 16 + 8 * 16) and matrices.shape == (8, 16, 16)
    assert matrices.dtype == torch.float32
    assert cache.state_bytes == recurrent_state_bytes(model.config, torch.float32) == 2 * (3 * 256 + 8 * 256) * 4
    assert cache.bytes_per_token == kv_bytes_per_token(model.config, torch.float32) == 2 * 2 * 2 * 32 * 4


@pytest.mark.parametrize("prefill_chunk", [512, 50])
def test_deltanet_prefill_over_several_chunks_matches_transformers(
    prefill_chunk: int, tiny_model: TinyModelFactory
) -> None:
    """140 tokens: three of DeltaNet's 64-token blocks in one pass, or three engine chunks of 50 that
    carry the states between them; both give transformers' logits."""
    from llmchat.engine.delta_net import CHUNK

    folder = tiny_model("qwen3_5")
    ids = random_ids(140, vocab_size(folder), seed=4)
    assert len(ids) > 2 * CHUNK
    reference = hf_logits(hf_model(folder), ids)
    model = llmchat.load(folder, device="cpu", dtype="float32", prefill_chunk=prefill_chunk)
    diff = (model.logits(ids) - reference).abs().max().item()
    assert diff <= TOL, f"{diff:.2e}"


def test_qwen3_5_gguf_twin_undoes_the_converters_rewrites(
    tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]
) -> None:
    """llama.cpp's qwen35: value heads tiled (4 key heads, 8 value heads), A_log as -exp(A_log), dt_bias
    as ssm_dt.bias, conv filters squeezed, (1 + w) norms stored as 1 + w. Undone, the file gives the
    folder's logits and tokens; a Q8_0 file packs the DeltaNet projections and stays close."""
    folder, path = tiny_model("qwen3_5"), tiny_gguf("qwen3_5")
    names = set(GGUFFile(path).tensor_info)
    assert {"blk.0.ssm_a", "blk.0.ssm_dt.bias", "blk.0.attn_qkv.weight", "blk.1.attn_q.weight"} <= names
    ours, theirs = (llmchat.load(p, device="cpu", dtype="float32") for p in (path, folder))
    fields = ("layer_kinds", "linear_key_heads", "linear_value_heads", "linear_value_dim", "conv_kernel", "head_dim")
    assert all(getattr(ours.config, f) == getattr(theirs.config, f) for f in fields)
    assert ours.config.rope.partial_rotary_factor == 0.25
    ids = random_ids(40, ours.config.vocab_size, seed=1)
    diff = (ours.logits(ids) - theirs.logits(ids)).abs().max().item()
    assert diff <= TOL, f"GGUF logits differ from the folder's by {diff:.2e}"
    assert _run(ours, ids[:12], 20)[0] == _run(theirs, ids[:12], 20)[0]

    quantized = tiny_gguf("qwen3_5", "Q8_0")
    packed = llmchat.load(quantized, device="cpu", dtype="float32")
    plain = llmchat.load(quantized, device="cpu", dtype="float32", packed=False)
    assert {"layers.0.delta.qkvzba.weight", "layers.0.delta.out_proj.weight"} <= set(packed.info.plan)
    approx, reference = packed.logits(ids), plain.logits(ids)
    # requantized to int8 rows, and the recurrence carries each position's rounding on
    off = (approx - reference).abs().amax(-1) / reference.abs().max()
    assert off.median().item() < 0.05 and (approx.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.8


def test_vram_and_bench_show_the_fixed_state_apart(tiny_model: TinyModelFactory) -> None:
    """The memory bill's KV column holds the recurrent states too, and says how much of it is fixed."""
    from llmchat.cli.bench import _shape_figures

    folder = tiny_model("qwen3_5")
    run = [sys.executable, "-m", "llmchat", "vram", str(folder), "--context", "64"]
    data = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    model = llmchat.load(folder, device="cpu", dtype="float32", context_length=64)
    assert data["recurrent_state_bytes"] == model.cache.state_bytes
    assert (
        data["estimates"][0]["kv_cache"]
        == model.cache.nbytes
        == 64 * model.cache.bytes_per_token + data["recurrent_state_bytes"]
    )
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "2 attention layers keep keys and values" in text and "short-convolution" not in text
    figures = _shape_figures(model)
    assert figures == {"recurrent_layers": 2, "recurrent_state_bytes": model.cache.state_bytes}
