"""Reference parity: llmchat's engine against transformers on tiny random-weight models.

For every kind in `tiny_models.KINDS`, in both config.json styles (and two sharded folders): the
logits of a 40-token input agree within `TOL`, 20 greedy tokens are those of transformers'
`generate`, and reusing the KV cache of a previous turn gives the answer a fresh prefill gives.
Then the details those miss: Gemma's half-precision rounding, LongRoPE's switch from short to long
factors with a KV cache (chunked prefill, rewinding), config normalization and its errors.

llmchat is imported by a fixture so that the tiny-model self-check runs without the engine.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from tests.hf_reference import hf_greedy, hf_logits, hf_model, random_ids, vocab_size
from tests.tiny_models import CONFIG_STYLES, IM_END, KINDS

TOL = 1e-4
NEW_TOKENS = 20
LOGITS_LEN = 40  # beyond the sliding windows (8) and the dynamic-NTK model's 24 positions
PROMPT_LEN = 12

TinyModelFactory = Callable[..., Path]  # the `tiny_model` fixture of conftest.py

CASES = [pytest.param(kind, style, False, id=f"{kind}-{style}") for kind in KINDS for style in CONFIG_STYLES]
CASES += [
    pytest.param("llama", "new", True, id="llama-new-sharded"),
    pytest.param("qwen3", "old", True, id="qwen3-old-sharded"),
]

hf_logging.disable_progress_bar()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def api() -> ModuleType:
    """The `llmchat` package."""
    return importlib.import_module("llmchat")


@pytest.fixture(scope="module")
def events() -> ModuleType:
    """`llmchat.engine.events`."""
    return importlib.import_module("llmchat.engine.events")


def _label(kind: str, style: str, sharded: bool = False) -> str:
    return f"{kind} ({style}-style config{', sharded' if sharded else ''})"


def _greedy(api: ModuleType, model: Any, prompt: list[int], max_new_tokens: int) -> list[Any]:
    """All events of a greedy llmchat generation that ignores EOS."""
    sampling = api.SamplingParams(temperature=0)
    return list(model.generate(prompt, sampling=sampling, max_new_tokens=max_new_tokens, stop_on_eos=False))


def _tokens(events: ModuleType, generated: list[Any]) -> list[int]:
    return [e.token_id for e in generated if isinstance(e, events.TokenEvent)]


def _prefill_done(events: ModuleType, generated: list[Any]) -> Any:
    (done,) = [e for e in generated if isinstance(e, events.PrefillDone)]
    return done


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_models_load_in_transformers(kind: str, tiny_model: TinyModelFactory) -> None:
    """Self-check of the builders: both config styles and sharding load into the same transformers model."""
    new, old, sharded = tiny_model(kind, "new"), tiny_model(kind, "old"), tiny_model(kind, "new", sharded=True)
    new_config, old_config = (json.loads((f / "config.json").read_text()) for f in (new, old))
    assert "rope_parameters" in new_config and "dtype" in new_config
    assert "rope_parameters" not in old_config and "dtype" not in old_config
    assert {"rope_theta", "rope_scaling", "torch_dtype"} <= old_config.keys()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2
    assert (sharded / "model.safetensors.index.json").is_file()

    tokenizer = Tokenizer.from_file(str(new / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == new_config["vocab_size"]
    eos = json.loads((new / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.token_to_id(IM_END) in (eos if isinstance(eos, list) else [eos])

    ids = random_ids(LOGITS_LEN, new_config["vocab_size"], seed=1)
    models = [hf_model(folder) for folder in (new, old, sharded)]
    reference = hf_logits(models[0], ids)
    assert torch.isfinite(reference).all() and reference.std() > 1.0, "logits too flat for greedy parity"
    for model in models[1:]:
        assert getattr(model.config, "layer_types", None) == getattr(models[0].config, "layer_types", None)
        assert getattr(model.config, "sliding_window", None) == getattr(models[0].config, "sliding_window", None)
        assert torch.equal(hf_logits(model, ids), reference), f"{kind}: styles/sharding load differently"


@pytest.mark.parametrize(("kind", "style", "sharded"), CASES)
def test_logits_match_transformers(
    kind: str, style: str, sharded: bool, tiny_model: TinyModelFactory, api: ModuleType
) -> None:
    """A 40-token forward gives the logits of transformers."""
    folder = tiny_model(kind, style, sharded)
    ids = random_ids(LOGITS_LEN, vocab_size(folder), seed=1)
    expected = hf_logits(hf_model(folder), ids)
    got = api.load(folder, device="cpu", dtype="float32").logits(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape, f"{_label(kind, style, sharded)}: {got.shape}"
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"{_label(kind, style, sharded)}: max |logit diff| {diff:.3g} > {TOL}"


@pytest.mark.parametrize(("kind", "style", "sharded"), CASES)
def test_greedy_matches_transformers(
    kind: str, style: str, sharded: bool, tiny_model: TinyModelFactory, api: ModuleType, events: ModuleType
) -> None:
    """20 greedy tokens (KV-cached decode) are those of transformers' `generate`."""
    folder = tiny_model(kind, style, sharded)
    prompt = random_ids(PROMPT_LEN, vocab_size(folder), seed=2)
    expected = hf_greedy(hf_model(folder), prompt, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    model = api.load(folder, device="cpu", dtype="float32")
    got = _tokens(events, _greedy(api, model, prompt, NEW_TOKENS))
    if got != expected:
        # Where it went wrong: the full-forward logits over the reference answer.
        full = prompt + expected
        diff = (model.logits(full) - hf_logits(hf_model(folder), full)).abs().max().item()
        step = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        pytest.fail(
            f"{_label(kind, style, sharded)}: greedy tokens differ from step {step}: "
            f"{got} != {expected}; max |logit diff| of a full forward over the reference: {diff:.3g}"
        )


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_reuse_matches_fresh_prefill(
    kind: str, tiny_model: TinyModelFactory, api: ModuleType, events: ModuleType
) -> None:
    """Turn 2 reuses turn 1's prompt+answer from the cache and still answers like a fresh model.

    Sizes keep every prefill within the dynamic-NTK model's 24 trained positions, where the cached
    and the fresh path are defined to agree; the sliding-window models (window 8) slide in both turns.
    """
    folder = tiny_model(kind)
    vocab = vocab_size(folder)
    model = api.load(folder, device="cpu", dtype="float32")
    prompt1 = random_ids(10, vocab, seed=3)
    turn1 = _greedy(api, model, prompt1, 6)
    assert _prefill_done(events, turn1).reused_tokens == 0, f"{_label(kind, 'new')}: a fresh model reused tokens"
    prompt2 = prompt1 + _tokens(events, turn1) + random_ids(6, vocab, seed=4)
    expected_last = model.logits(prompt2)[-1]  # between the turns: must leave the cache alone

    turn2 = _greedy(api, model, prompt2, 6)
    fresh = _greedy(api, api.load(folder, device="cpu", dtype="float32"), prompt2, 6)
    label = _label(kind, "new")
    assert _tokens(events, turn2) == _tokens(events, fresh), f"{label}: the cached turn answers differently"

    done = _prefill_done(events, turn2)
    shared = len(prompt1) + 6
    assert shared - 1 <= done.reused_tokens < len(prompt2), f"{label}: reused {done.reused_tokens} of {shared}"
    assert done.reused_tokens + done.prefilled_tokens == done.prompt_tokens == len(prompt2), f"{label}: {done}"

    first = next(e for e in turn2 if isinstance(e, events.TokenEvent))
    diff = abs(first.logit - expected_last[first.token_id].item())
    assert first.token_id == int(expected_last.argmax()), f"{label}: cached prefill picked another token"
    assert diff <= TOL, f"{label}: cached-prefill logit differs from a full forward by {diff:.3g} > {TOL}"


# --- Gemma in half precision --------------------------------------------------------------------
# Gemma multiplies the normalized x by (1 + w) in float32 before casting, and rounds sqrt(hidden) to
# the model's dtype before scaling embeddings (hidden 48: sqrt is inexact). Either done the Llama
# way moves about a third of the bfloat16 logits by one unit in the last place: mean |diff| ≈ 0.017.
HALF_MEAN_TOL = 1e-3


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_gemma_bfloat16_rounds_like_transformers(kind: str, tiny_model: TinyModelFactory, api: ModuleType) -> None:
    folder = tiny_model(kind)
    ids = random_ids(LOGITS_LEN, vocab_size(folder), seed=1)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    expected = hf_logits(reference, ids).float()
    got = api.load(folder, device="cpu", dtype="bfloat16").logits(ids)
    diff = (got - expected).abs().mean().item()
    assert diff <= HALF_MEAN_TOL, f"{kind} (bfloat16): mean |logit diff| {diff:.3g} > {HALF_MEAN_TOL}"


# --- LongRoPE and the KV cache --------------------------------------------------------------------
# transformers' Phi-3 recomputes the whole sequence with the long factors the first time it grows
# past original_max_position_embeddings (24 here), so a cached prefix never mixes the two sets.


def test_longrope_chunked_prefill_matches_one_pass(
    tiny_model: TinyModelFactory, api: ModuleType, events: ModuleType
) -> None:
    """A 30-token prompt prefilled 8 tokens at a time (short factors until the chunk that passes 24)
    answers like transformers, which prefills it in one pass with the long factors."""
    folder = tiny_model("phi3-longrope")
    prompt = random_ids(30, vocab_size(folder), seed=5)
    expected = hf_greedy(hf_model(folder), prompt, NEW_TOKENS)
    model = api.load(folder, device="cpu", dtype="float32", prefill_chunk=8)
    assert _tokens(events, _greedy(api, model, prompt, NEW_TOKENS)) == expected


def test_longrope_rewind_below_original_length_matches_fresh(
    tiny_model: TinyModelFactory, api: ModuleType, events: ModuleType
) -> None:
    """After a turn that went past 24 positions (long factors), a turn that rewinds to 18 tokens
    reuses the cached prefix and still answers like a fresh model (short factors)."""
    folder = tiny_model("phi3-longrope")
    vocab = vocab_size(folder)
    model = api.load(folder, device="cpu", dtype="float32")
    prompt1 = random_ids(20, vocab, seed=6)
    _greedy(api, model, prompt1, 8)  # the cache ends past 24: long factors
    prompt2 = prompt1[:14] + random_ids(4, vocab, seed=7)
    turn2 = _greedy(api, model, prompt2, 6)
    assert _prefill_done(events, turn2).reused_tokens == 14
    fresh = _greedy(api, api.load(folder, device="cpu", dtype="float32"), prompt2, 6)
    assert _tokens(events, turn2) == _tokens(events, fresh)
    first = next(e for e in turn2 if isinstance(e, events.TokenEvent))
    expected_last = hf_logits(hf_model(folder), prompt2)[-1]
    assert abs(first.logit - expected_last[first.token_id].item()) <= TOL


@pytest.mark.parametrize("kind", ["phi3-longrope", "llama-dynamic"])
def test_chunks_told_the_request_length_match_one_pass(
    kind: str, tiny_model: TinyModelFactory, api: ModuleType
) -> None:
    """Forward passes given `rope_length` (the length a chunked prefill reaches) rotate with the
    RoPE of the whole sequence (LongRoPE's long factors, dynamic NTK's base for 40 positions), so
    8-token chunks give the logits of transformers' single 40-token pass."""
    folder = tiny_model(kind)
    ids = random_ids(LOGITS_LEN, vocab_size(folder), seed=1)
    expected = hf_logits(hf_model(folder), ids)
    loaded = api.load(folder, device="cpu", dtype="float32")
    rows = []
    with torch.inference_mode():
        for begin in range(0, LOGITS_LEN, 8):
            chunk = ids[begin : begin + 8]
            rows.append(loaded.model(torch.tensor(chunk), loaded.cache, begin, rope_length=LOGITS_LEN))
            loaded.cache.append_tokens(chunk)
    diff = (torch.cat(rows).float() - expected).abs().max().item()
    assert diff <= TOL, f"{kind}: chunked max |logit diff| {diff:.3g} > {TOL}"


# --- configs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_config() -> ModuleType:
    """`llmchat.engine.config`."""
    return importlib.import_module("llmchat.engine.config")


@pytest.mark.parametrize("kind", KINDS)
def test_config_styles_normalize_the_same(kind: str, tiny_model: TinyModelFactory, engine_config: ModuleType) -> None:
    """Old- and new-style config.json of one model give one ModelConfig."""
    new, old = (engine_config.load_hf_config(tiny_model(kind, style)) for style in CONFIG_STYLES)
    assert new == old


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count_matches_transformers(kind: str, tiny_model: TinyModelFactory) -> None:
    """The memory math counts the parameters transformers builds (tied matrices once)."""
    config = importlib.import_module("llmchat.engine.config").load_hf_config(tiny_model(kind))
    count = importlib.import_module("llmchat.engine.memory").parameter_count(config)
    assert count == sum(p.numel() for p in hf_model(tiny_model(kind)).parameters())


_MINIMAL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "vocab_size": 300,
}


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "phi3"])
def test_absent_keys_take_transformers_defaults(model_type: str, engine_config: ModuleType) -> None:
    """A config.json that leaves keys out (as GGUF-derived ones may) means transformers' defaults."""
    reference = AutoConfig.for_model(model_type, **_MINIMAL)
    config = engine_config.from_hf_config({"model_type": model_type, **_MINIMAL})
    head_dim = getattr(reference, "head_dim", None) or reference.hidden_size // reference.num_attention_heads
    assert config.head_dim == head_dim
    assert config.max_position_embeddings == reference.max_position_embeddings
    assert config.rms_norm_eps == reference.rms_norm_eps
    assert config.tie_word_embeddings == reference.tie_word_embeddings
    assert config.final_softcap == getattr(reference, "final_logit_softcapping", None)
    window = getattr(reference, "sliding_window", None)
    assert config.sliding_window == window
    types = getattr(reference, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * 7
    assert config.sliding_layers == tuple(t == "sliding_attention" for t in types)
    if model_type.startswith("gemma"):
        assert config.attn_scale == reference.query_pre_attn_scalar**-0.5
        assert config.hidden_act == reference.hidden_activation
    if model_type == "gemma2":
        assert config.attn_softcap == reference.attn_logit_softcapping
    if model_type == "gemma3_text":
        assert config.rope.theta == reference.rope_parameters["full_attention"]["rope_theta"]
        assert config.local_rope.theta == reference.rope_parameters["sliding_attention"]["rope_theta"]


def _edited_config(folder: Path, tmp_path: Path, **changes: Any) -> tuple[dict[str, Any], str]:
    raw = {**json.loads((folder / "config.json").read_text()), **changes}
    return raw, str(tmp_path / "config.json")


def test_multimodal_gemma3_without_its_text_config_is_refused_by_name(
    tiny_model: TinyModelFactory, tmp_path: Path, engine_config: ModuleType
) -> None:
    """A Gemma3ForConditionalGeneration config carries the language model under text_config (then it loads,
    tests/test_multimodal.py); one without it cannot be read."""
    errors = importlib.import_module("llmchat.engine.errors")
    raw, source = _edited_config(tiny_model("gemma3"), tmp_path, architectures=["Gemma3ForConditionalGeneration"])
    with pytest.raises(errors.UnsupportedArchitectureError) as info:
        engine_config.from_hf_config(raw, source=source)
    message = str(info.value)
    assert source in message and "Gemma3ForConditionalGeneration" in message and "Gemma3ForCausalLM" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kind", "changes", "named"),
    [
        ("gemma2", {"use_bidirectional_attention": True}, "bidirectional"),
        ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "chunked_attention"),
        ("gemma3", {"layer_types": ["full_attention"]}, "layer_types"),
        (
            "phi3-longrope",
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8}},
            "long_factor",
        ),
        ("phi3", {"rope_parameters": {"rope_type": "su2", "rope_theta": 1e4}}, "su2"),
    ],
)
def test_bad_configs_fail_with_one_line(
    kind: str,
    changes: dict[str, Any],
    named: str,
    tiny_model: TinyModelFactory,
    tmp_path: Path,
    engine_config: ModuleType,
) -> None:
    errors = importlib.import_module("llmchat.engine.errors")
    raw, source = _edited_config(tiny_model(kind), tmp_path, **changes)
    with pytest.raises(errors.ModelLoadError) as info:
        engine_config.from_hf_config(raw, source=source)
    message = str(info.value)
    assert source in message and named in message and "\n" not in message


def test_longrope_factor_count_is_checked_at_load(
    tiny_model: TinyModelFactory, tmp_path: Path, api: ModuleType
) -> None:
    """Factor lists must have one entry per rotary frequency (head_dim 16: 8)."""
    errors = importlib.import_module("llmchat.engine.errors")
    folder = Path(shutil.copytree(tiny_model("phi3-longrope"), tmp_path / "m"))
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"]["long_factor"] = [1.0] * 6
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(errors.ModelLoadError, match="longrope has 6 factors for 8 rotary frequencies"):
        api.load(folder, device="cpu", dtype="float32")


# --- sliding windows in a ring ----------------------------------------------------------------------
# Sliding layers keep window + slack positions (kv_cache.py). The real slack (1024) is larger than
# these sequences, so here it is 2: the window-8 layers hold a ring of 10 slots and take prefill in
# parts of 3, and every path below runs with the ring wrapped, against transformers' full cache.

RING_KINDS = ["mistral", "qwen2-sliding", "gemma2", "gemma3", "phi3", "cohere2", "exaone4"]
SMALL_SLACK = 2


@pytest.fixture()
def small_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.import_module("llmchat.engine.kv_cache"), "RING_SLACK", SMALL_SLACK)


def _ring_model(api: ModuleType, folder: Path, **options: Any) -> Any:
    model = api.load(folder, device="cpu", dtype="float32", context_length=96, **options)
    window = model.config.sliding_window
    assert model.cache.ring == window + SMALL_SLACK and model.cache.ring_keys.shape[0] > 0, "no ring in use"
    assert model.cache.nbytes < model.cache.bytes_per_token * model.cache.capacity
    return model


@pytest.mark.parametrize("kind", RING_KINDS)
def test_ring_logits_match_transformers(
    kind: str, tiny_model: TinyModelFactory, api: ModuleType, small_ring: None
) -> None:
    """A 40-token pass through a fresh cache whose rings hold 10 slots: attended 3 positions at a
    time in the sliding layers, and still transformers' logits."""
    folder = tiny_model(kind)
    ids = random_ids(LOGITS_LEN, vocab_size(folder), seed=1)
    expected = hf_logits(hf_model(folder), ids)
    diff = (_ring_model(api, folder).logits(ids) - expected).abs().max().item()
    assert diff <= TOL, f"{kind}: max |logit diff| {diff:.3g} > {TOL}"


@pytest.mark.parametrize("kind", RING_KINDS)
def test_ring_decodes_past_the_window_like_transformers(
    kind: str, tiny_model: TinyModelFactory, api: ModuleType, events: ModuleType, small_ring: None
) -> None:
    """Prefill chunks (16) longer than the window (8) and the slack, then 20 decode steps that wrap the
    ring again and again: transformers' greedy tokens, and each step's logit its full-pass one."""
    folder = tiny_model(kind)
    prompt = random_ids(20, vocab_size(folder), seed=2)
    reference = hf_model(folder)
    expected = hf_greedy(reference, prompt, NEW_TOKENS)
    model = _ring_model(api, folder, prefill_chunk=16)
    generated = _greedy(api, model, prompt, NEW_TOKENS)
    assert _tokens(events, generated) == expected, kind
    full = hf_logits(reference, prompt + expected)
    steps = [e for e in generated if isinstance(e, events.TokenEvent)]
    worst = max(abs(e.logit - full[len(prompt) - 1 + e.index, e.token_id].item()) for e in steps)
    assert worst <= TOL, f"{kind}: a decode step's logit differs by {worst:.3g}"
    assert model.cache.used_bytes < model.cache.length * model.cache.bytes_per_token  # the rings hold less


@pytest.mark.parametrize("kind", RING_KINDS)
def test_ring_rewinds_reuse_what_it_holds_and_prefill_the_rest(
    kind: str, tiny_model: TinyModelFactory, api: ModuleType, events: ModuleType, small_ring: None
) -> None:
    """Regenerate (back 19 positions: past the slack, so the rings lack the window and everything is
    prefilled again), a branch 2 tokens back (within the slack: reused), one 10 back (prefilled
    again), and the next turn (reused): each answers like transformers."""
    folder = tiny_model(kind)
    vocab = vocab_size(folder)
    prompt = random_ids(PROMPT_LEN, vocab, seed=3)
    reference = hf_model(folder)
    model = _ring_model(api, folder)
    first = _tokens(events, _greedy(api, model, prompt, NEW_TOKENS))
    assert first == hf_greedy(reference, prompt, NEW_TOKENS)

    again = _greedy(api, model, prompt, NEW_TOKENS)
    assert _prefill_done(events, again).reused_tokens == 0 and _tokens(events, again) == first

    def branch(kept: int) -> list[Any]:
        answer = model.generate(
            prompt, sampling=api.SamplingParams(temperature=0), max_new_tokens=NEW_TOKENS,
            stop_on_eos=False, answer_prefix=first[:kept],
        )  # fmt: skip
        return list(answer)

    near = branch(NEW_TOKENS - 2)  # the cache holds prompt + 19; this request resumes at prompt + 17
    assert _prefill_done(events, near).reused_tokens == PROMPT_LEN + NEW_TOKENS - 3
    assert _tokens(events, near) == first[NEW_TOKENS - 2 :]
    far = branch(8)
    assert _prefill_done(events, far).reused_tokens == 0 and _tokens(events, far) == first[8:]

    prompt2 = prompt + first + random_ids(5, vocab, seed=4)
    turn2 = _greedy(api, model, prompt2, 6)
    assert _prefill_done(events, turn2).reused_tokens == PROMPT_LEN + NEW_TOKENS - 1
    hf_next = hf_logits(reference, prompt2)[-1]
    step = next(e for e in turn2 if isinstance(e, events.TokenEvent))
    assert step.token_id == int(hf_next.argmax()) and abs(step.logit - hf_next[step.token_id].item()) <= TOL


@pytest.mark.parametrize("kind", RING_KINDS)
def test_ring_step_logits_after_the_wrap(
    kind: str, tiny_model: TinyModelFactory, api: ModuleType, events: ModuleType, small_ring: None
) -> None:
    """Re-reading a step of an answer whose rings wrapped: the latest few straight from the cache, an
    earlier one by prefilling again (the rings lack its window), each transformers' logits; and the
    cache answers right afterwards."""
    folder = tiny_model(kind)
    prompt = random_ids(PROMPT_LEN, vocab_size(folder), seed=5)
    reference = hf_model(folder)
    model = _ring_model(api, folder)
    answer = _tokens(events, _greedy(api, model, prompt, NEW_TOKENS))
    generator = model.generator
    # The cache holds prompt + 19 tokens; re-running step i runs position prompt + i - 1, whose window
    # the rings hold while 20 - i <= slack + 1 (steps 17 and up).
    near = NEW_TOKENS - SMALL_SLACK - 1
    for index in (NEW_TOKENS - 1, NEW_TOKENS - 2, near, near - 1, 3, 0):
        sequence = prompt + answer[:index]
        before = list(model.cache.tokens)
        if index < near:  # too far back for the rings: not without prefilling
            with pytest.raises(ValueError, match="no longer in the KV cache"):
                generator.step_logits(sequence)
        got = generator.step_logits(sequence, prefill=True)
        expected = hf_logits(reference, sequence)[-1]
        diff = (got - expected).abs().max().item()
        assert diff <= TOL, f"{kind}: step {index} differs by {diff:.3g}"
        if index >= near:
            assert model.cache.tokens == before  # read from the cache, which is left as it was
    again = _tokens(events, _greedy(api, model, prompt, NEW_TOKENS))
    assert again == answer


def test_ring_with_longrope_rerun_matches_transformers(
    tiny_model: TinyModelFactory, api: ModuleType, events: ModuleType, small_ring: None, tmp_path: Path
) -> None:
    """Phi-3 LongRoPE with a window of 8: crossing 24 positions re-runs the cached prefix with the long
    factors, through rings that wrap; a rewind below 24 re-runs it with the short ones."""
    folder = Path(shutil.copytree(tiny_model("phi3-longrope"), tmp_path / "phi3-longrope-window"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"sliding_window": 8}))
    vocab = vocab_size(folder)
    prompt = random_ids(30, vocab, seed=6)
    model = _ring_model(api, folder, prefill_chunk=8)
    assert _tokens(events, _greedy(api, model, prompt, NEW_TOKENS)) == hf_greedy(hf_model(folder), prompt, NEW_TOKENS)
    short = prompt[:14] + random_ids(4, vocab, seed=7)
    turn = _greedy(api, model, short, 6)
    assert _tokens(events, turn) == hf_greedy(hf_model(folder), short, NEW_TOKENS)[:6]
