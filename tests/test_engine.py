"""Engine behaviour beyond reference parity: KV cache, prefill chunks, stops, cancellation, streaming."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import llmchat
from llmchat.engine.config import from_hf_config
from llmchat.engine.errors import ContextFullError
from llmchat.engine.events import Finished, ForcedPrefix, PrefillDone, PrefillProgress, TokenEvent
from llmchat.engine.generate import _StopStrings
from llmchat.engine.kv_cache import KVCache
from llmchat.engine.package import DEFAULT_SAMPLING, GenerationDefaults
from tests.conftest import TinyModelFactory
from tests.tiny_models import build_tiny_model

GREEDY = llmchat.SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("engine") / "llama")


@pytest.fixture()
def model(folder: Path) -> llmchat.LoadedModel:
    return llmchat.load(folder, device="cpu", dtype="float32", context_length=96)


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 200, (n,), generator=g).tolist()


def _tokens(events: list) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def _finished(events: list) -> Finished:
    assert isinstance(events[-1], Finished), events[-1]
    return events[-1]


# --- KV cache ------------------------------------------------------------------------------------


def test_kv_cache_is_preallocated_with_exact_bytes() -> None:
    cache = KVCache(num_layers=3, num_kv_heads=2, head_dim=8, capacity=50, dtype=torch.float32)
    assert cache.nbytes == 2 * 3 * 2 * 50 * 8 * 4
    assert cache.bytes_per_token == 2 * 3 * 2 * 8 * 4
    assert cache.length == 0 and cache.used_bytes == 0
    cache.append_tokens([5, 6, 7, 8])
    assert cache.used_bytes == 4 * cache.bytes_per_token
    assert cache.common_prefix([5, 6, 9]) == 2
    cache.truncate(1)
    assert cache.tokens == [5] and cache.free == 49
    with pytest.raises(ValueError):
        cache.append_tokens(list(range(50)))


def _write(cache: KVCache, start: int, n: int, value: float = 0.0) -> None:
    """Write positions [start, start + n) in both layers: keys = position + value, values = -keys."""
    for layer in range(2):
        block = value + torch.arange(start, start + n, dtype=torch.float32)[None, :, None].expand(1, n, 4)
        cache.write(layer, start, block, -block)


def _fill(cache: KVCache, start: int, n: int) -> None:
    _write(cache, start, n)
    cache.append_tokens(list(range(start, start + n)))


def test_a_sliding_layer_keeps_a_ring_of_window_plus_slack() -> None:
    """Window 4 + slack 2: 6 slots, position p in slot p % 6, each slot knowing its position; the rest
    of the context is not allocated. Going back at most slack + 1 = 3 positions keeps the window
    before the new end; further back it is gone, and truncating there is refused."""
    cache = KVCache(2, 1, 4, capacity=20, windows=(None, 4), slack=2)
    assert (cache.ring, cache.keys.shape[2], cache.ring_keys.shape[2]) == (6, 20, 6)
    assert cache.nbytes == 2 * 4 * 4 * (20 + 6)
    _fill(cache, 0, 4)
    _fill(cache, 4, 6)  # positions 4..9: the ring wraps
    keys, values, positions = cache.view(1, 10)
    assert positions.tolist() == [6, 7, 8, 9, 4, 5]
    assert keys[0, :, 0].tolist() == positions.tolist() and values[0, :, 0].tolist() == [-p for p in positions]
    full_keys, _, none = cache.view(0, 10)
    assert none is None and full_keys[0, :, 0].tolist() == list(range(10))
    assert cache.used_bytes == 2 * 4 * 4 * (10 + 6)
    assert cache.chunk_limit(1) == 3 and cache.chunk_limit(0) is None
    assert [n for n in range(11) if cache.resumable(n)] == [0, 7, 8, 9, 10]  # 0: nothing needed
    with pytest.raises(ValueError, match="no longer hold"):
        cache.truncate(6)
    assert cache.length == 10  # nothing forgotten by the refusal
    cache.truncate(7)
    _fill(cache, 7, 2)  # a branch: 7 and 8 again
    # slot 3 still holds 9 of the old branch: after the end, so masked until 9 is written again
    assert cache.view(1, 9)[2].tolist() == [6, 7, 8, 9, 4, 5]
    saved = cache.save_positions(8, 9)
    _write(cache, 8, 1, value=100.0)  # an inspector re-running step 8
    assert cache.view(1, 9)[0][0, 2, 0].item() == 108.0 and cache.view(0, 9)[0][0, 8, 0].item() == 108.0
    cache.restore_positions(8, 9, saved)
    assert cache.view(1, 9)[0][0, 2, 0].item() == 8.0 and cache.view(0, 9)[0][0, 8, 0].item() == 8.0
    cache.truncate(0)  # back to the start is always possible
    assert cache.length == 0 and cache.resumable(0)


def test_memory_stays_flat_while_decoding(model: llmchat.LoadedModel) -> None:
    before = model.cache.keys.data_ptr()
    list(model.generate(_prompt(10), sampling=GREEDY, max_new_tokens=20, stop_on_eos=False))
    assert model.cache.keys.data_ptr() == before  # the cache was never reallocated


# --- prefill and prefix reuse --------------------------------------------------------------------


def test_chunked_prefill_gives_the_same_logits_and_tokens(folder: Path) -> None:
    prompt = _prompt(40)
    whole = llmchat.load(folder, device="cpu", dtype="float32", context_length=96, prefill_chunk=512)
    chunked = llmchat.load(folder, device="cpu", dtype="float32", context_length=96, prefill_chunk=7)
    events = list(chunked.generate(prompt, sampling=GREEDY, max_new_tokens=10, stop_on_eos=False))
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert [p.chunk_tokens for p in progress] == [7, 7, 7, 7, 7, 5]
    assert progress[-1].done_tokens == 40 and progress[-1].cache_tokens == 40
    reference = list(whole.generate(prompt, sampling=GREEDY, max_new_tokens=10, stop_on_eos=False))
    assert _tokens(events) == _tokens(reference)
    first = [e for e in events if isinstance(e, TokenEvent)][0]
    first_ref = [e for e in reference if isinstance(e, TokenEvent)][0]
    assert first.logit == pytest.approx(first_ref.logit, abs=1e-4)


def test_second_turn_prefills_only_new_tokens_and_matches_recompute(folder: Path, model: llmchat.LoadedModel) -> None:
    turn1 = _prompt(30, seed=1)
    answer = _tokens(list(model.generate(turn1, sampling=GREEDY, max_new_tokens=8, stop_on_eos=False)))
    turn2 = turn1 + answer + _prompt(12, seed=2)
    events = list(model.generate(turn2, sampling=GREEDY, max_new_tokens=8, stop_on_eos=False))
    done = next(e for e in events if isinstance(e, PrefillDone))
    # The last answer token was sampled but never fed back, so it is prefilled with the new turn.
    assert done.reused_tokens == 30 + 8 - 1
    assert done.prefilled_tokens == len(turn2) - done.reused_tokens
    fresh = llmchat.load(folder, device="cpu", dtype="float32", context_length=96)
    recomputed = list(fresh.generate(turn2, sampling=GREEDY, max_new_tokens=8, stop_on_eos=False))
    assert _tokens(events) == _tokens(recomputed)
    cached_first = [e for e in events if isinstance(e, TokenEvent)][0]
    full_logits = fresh.logits(turn2)[-1]
    assert cached_first.logit == pytest.approx(full_logits.max().item(), abs=1e-4)


def test_same_prompt_twice_reruns_only_the_last_token(model: llmchat.LoadedModel) -> None:
    prompt = _prompt(20)
    first = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=3, stop_on_eos=False))
    again = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=3, stop_on_eos=False))
    done = next(e for e in again if isinstance(e, PrefillDone))
    assert (done.reused_tokens, done.prefilled_tokens) == (19, 1)
    assert _tokens(first) == _tokens(again)


def test_logits_leave_the_chat_cache_alone(model: llmchat.LoadedModel) -> None:
    list(model.generate(_prompt(10), sampling=GREEDY, max_new_tokens=3, stop_on_eos=False))
    cached = list(model.cache.tokens)
    model.logits(_prompt(30, seed=5))
    assert model.cache.tokens == cached


# --- stopping -------------------------------------------------------------------------------------


def test_max_new_tokens(model: llmchat.LoadedModel) -> None:
    events = list(model.generate(_prompt(5), sampling=GREEDY, max_new_tokens=6, stop_on_eos=False))
    done = _finished(events)
    assert done.reason == "max_new_tokens" and done.generated_tokens == 6 == len(_tokens(events))
    assert done.decode_tokens_per_second > 0 and done.ttft_seconds > 0


def test_full_context_finishes_cleanly(folder: Path) -> None:
    small = llmchat.load(folder, device="cpu", dtype="float32", context_length=24)
    events = list(small.generate(_prompt(20), sampling=GREEDY, max_new_tokens=50, stop_on_eos=False))
    done = _finished(events)
    assert done.reason == "context_full"
    assert done.generated_tokens == 24 - 20 + 1  # the last token needs no cache slot of its own
    with pytest.raises(ContextFullError, match="25 tokens"):
        list(small.generate(_prompt(25), sampling=GREEDY, max_new_tokens=5))


def test_eos_stops_and_is_not_streamed(model: llmchat.LoadedModel) -> None:
    prompt = _prompt(12)
    free_run = _tokens(list(model.generate(prompt, sampling=GREEDY, max_new_tokens=6, stop_on_eos=False)))
    stop_id = free_run[3]
    model.generator.eos_token_ids = frozenset({stop_id})
    events = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=6))
    produced = _tokens(events)
    assert _finished(events).reason == "eos"
    assert stop_id not in produced and produced == free_run[: free_run.index(stop_id)]
    end = _finished(events).end_step  # the step that chose to stop, for the inspector
    assert end is not None and end.token_id == stop_id and end.index == len(produced)
    logits = model.logits(prompt + produced)[-1]
    assert end.prob == pytest.approx(float(logits.softmax(-1)[stop_id]), abs=1e-5)
    assert _finished(list(model.generate(prompt, sampling=GREEDY, max_new_tokens=2))).end_step is None


def test_cancel_stops_within_one_step(model: llmchat.LoadedModel) -> None:
    cancel = threading.Event()
    events = []
    for event in model.generate(_prompt(8), sampling=GREEDY, max_new_tokens=50, stop_on_eos=False, cancel=cancel):
        events.append(event)
        if isinstance(event, TokenEvent) and event.index == 2:
            cancel.set()
    done = _finished(events)
    assert done.reason == "cancelled" and done.generated_tokens == 3


def test_cancel_during_prefill(folder: Path) -> None:
    chunked = llmchat.load(folder, device="cpu", dtype="float32", context_length=96, prefill_chunk=4)
    cancel = threading.Event()
    events = []
    for event in chunked.generate(_prompt(40), sampling=GREEDY, max_new_tokens=5, cancel=cancel):
        events.append(event)
        if isinstance(event, PrefillProgress):
            cancel.set()
    done = _finished(events)
    assert done.reason == "cancelled" and done.generated_tokens == 0
    assert chunked.cache.length == 4  # what was prefilled stays valid for the next request


def test_stop_strings_cut_the_text_and_never_stream_it() -> None:
    stops = _StopStrings(["STOP", "<end>"])
    pieces = [stops.feed(p) for p in ["Hello ", "wor", "ld S", "TO", "P more"]]
    streamed = "".join(text for text, _ in pieces)
    assert streamed == "Hello world " and stops.text == "Hello world "
    assert [hit for _, hit in pieces] == [False, False, False, False, True]
    held = _StopStrings(["<end>"])
    assert held.feed("a <e") == ("a ", False)  # "<e" may begin the stop string: held back
    assert held.feed("x") == ("<ex", False)


def test_stop_string_ends_generation(model: llmchat.LoadedModel) -> None:
    prompt = _prompt(12)
    free = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=10, stop_on_eos=False))
    text = _finished(free).text
    assert len(text) > 4
    stop = text[2:4]
    events = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=10, stop_on_eos=False, stop_strings=[stop]))
    done = _finished(events)
    assert done.reason == "stop_string"
    assert done.text == text[: text.index(stop)]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == done.text


# --- events ---------------------------------------------------------------------------------------


def test_token_events_carry_consistent_probabilities(model: llmchat.LoadedModel) -> None:
    sampling = llmchat.SamplingParams(temperature=0.8, top_k=5, seed=3)
    events = list(model.generate(_prompt(10), sampling=sampling, max_new_tokens=8, stop_on_eos=False, top_k=5))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) == 8
    for event in tokens:
        assert len(event.top) == 5
        probs = [t.prob for t in event.top]
        assert probs == sorted(probs, reverse=True)
        assert 0 <= event.rank < 5  # top-k=5 sampling can only pick one of the five best
        assert event.top[event.rank].token_id == event.token_id
        assert event.top[event.rank].prob == pytest.approx(event.prob)
        assert sum(t.policy_prob for t in event.top) == pytest.approx(1.0, abs=1e-5)
        assert event.cache_bytes == event.cache_tokens * model.cache.bytes_per_token


def test_stream_concatenates_to_the_decoded_answer(model: llmchat.LoadedModel) -> None:
    events = list(
        model.generate(_prompt(10), sampling=llmchat.SamplingParams(seed=1), max_new_tokens=30, stop_on_eos=False)
    )
    done = _finished(events)
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent)) + done.tail
    assert streamed == model.tokenizer.decode(list(done.token_ids)) == done.text


def test_live_sampling_changes_the_policy_from_the_next_token(model: llmchat.LoadedModel) -> None:
    """A knob turned mid-answer (the TUI's keys) applies from the next token on, not the whole answer."""
    greedy = llmchat.SamplingParams(temperature=0.0)
    free = llmchat.SamplingParams(temperature=1.0, seed=5)
    asked: list[int] = []

    def live() -> llmchat.SamplingParams:
        asked.append(1)
        return greedy if len(asked) <= 3 else free

    events = list(model.generate(_prompt(10), sampling=greedy, max_new_tokens=8, stop_on_eos=False, live_sampling=live))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert len(asked) == len(tokens) == 8
    # Greedy puts all policy mass on the chosen token; plain temperature 1 leaves the raw distribution.
    assert [e.policy_prob for e in tokens[:3]] == [1.0, 1.0, 1.0]
    for event in tokens[3:]:
        assert event.policy_prob == pytest.approx(event.prob, rel=1e-4)
        assert event.policy_prob < 1.0


def test_seeded_sampling_reproduces(folder: Path) -> None:
    runs = []
    for _ in range(2):
        m = llmchat.load(folder, device="cpu", dtype="float32", context_length=64)
        sampling = llmchat.SamplingParams(temperature=1.0, seed=1234)
        runs.append(_tokens(list(m.generate(_prompt(6), sampling=sampling, max_new_tokens=12, stop_on_eos=False))))
    assert runs[0] == runs[1]


# --- config and defaults --------------------------------------------------------------------------


def test_both_config_styles_normalize_the_same(tmp_path: Path) -> None:
    new = build_tiny_model("llama3-rope", tmp_path / "new", config_style="new")
    old = build_tiny_model("llama3-rope", tmp_path / "old", config_style="old")
    raw_new = json.loads((new / "config.json").read_text())
    raw_old = json.loads((old / "config.json").read_text())
    assert "rope_parameters" in raw_new and "rope_scaling" in raw_old and "rope_parameters" not in raw_old
    assert from_hf_config(raw_new) == from_hf_config(raw_old)
    assert from_hf_config(raw_new).rope.type == "llama3"


def test_generation_config_overrides_defaults_and_user_overrides_both(folder: Path) -> None:
    gen = GenerationDefaults.from_dict({"temperature": 0.3, "top_p": 0.8, "max_new_tokens": 77, "eos_token_id": [5, 6]})
    assert gen.sampling.temperature == 0.3 and gen.sampling.top_p == 0.8
    assert gen.sampling.top_k == DEFAULT_SAMPLING.top_k  # untouched keys keep the built-in default
    assert gen.max_new_tokens == 77 and gen.eos_token_ids == (5, 6)
    assert GenerationDefaults.from_dict({"do_sample": False, "temperature": 0.6}).sampling.greedy
    assert GenerationDefaults.from_dict({"eos_token_id": 9}).eos_token_ids == (9,)
    user = gen.sampling.replace(temperature=1.1)
    assert user.temperature == 1.1 and user.top_p == 0.8


def test_bfloat16_runs_the_other_weight_layout_and_agrees(folder: Path) -> None:
    fp32 = llmchat.load(folder, device="cpu", dtype="float32", context_length=64)
    bf16 = llmchat.load(folder, device="cpu", dtype="bfloat16", context_length=64)
    assert fp32.model.lm_head.transposed and not bf16.model.lm_head.transposed
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    ids = _prompt(30)
    reference, half = fp32.logits(ids), bf16.logits(ids)
    # bf16 keeps ~3 significant digits: a wrong layout would be off by the logits themselves (~4).
    assert (reference - half).abs().max().item() < 0.5
    agree = (reference.argmax(-1) == half.argmax(-1)).float().mean().item()
    assert agree > 0.9


def test_load_reports_progress_per_tensor(tiny_model) -> None:  # type: ignore[no-untyped-def]
    import llmchat
    from llmchat.engine.package import open_package

    folder = tiny_model("llama")
    seen: list[tuple[int, int]] = []
    llmchat.load(folder, device="cpu", dtype="float32", context_length=32, progress=lambda d, t: seen.append((d, t)))
    total = len(open_package(folder).weights.tensor_names())
    assert seen == [(i, total) for i in range(1, total + 1)]


# --- continuing from chosen tokens, and re-reading a step (the inspector's engine side) ---------


def test_an_answer_prefix_continues_like_the_original_and_prefills_one_token(model: llmchat.LoadedModel) -> None:
    """Greedy from prompt + the first k tokens of a greedy answer is that answer's rest: the prefix
    comes from the cache (one token prefilled), its text is handed over once, indices continue, and
    the prefix counts toward max_new_tokens (10 in all: k kept, 10 - k generated)."""
    prompt = _prompt(12)
    first = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=10, stop_on_eos=False))
    answer = _tokens(first)
    k = 4
    events = list(
        model.generate(prompt, sampling=GREEDY, max_new_tokens=10, stop_on_eos=False, answer_prefix=answer[:k])
    )
    done = _finished(events)
    prefill = next(e for e in events if isinstance(e, PrefillDone))
    forced = next(e for e in events if isinstance(e, ForcedPrefix))
    assert (prefill.reused_tokens, prefill.prefilled_tokens) == (len(prompt) + k - 1, 1)
    assert forced.token_ids == tuple(answer[:k])
    assert _tokens(events) == answer[k:]
    assert [e.index for e in events if isinstance(e, TokenEvent)] == list(range(k, 10))
    assert done.token_ids == tuple(answer) and (done.prefix_tokens, done.generated_tokens) == (k, 6)
    assert done.text == _finished(first).text and done.text.startswith(forced.text)


def test_an_end_of_sequence_token_in_the_prefix_ends_the_answer(model: llmchat.LoadedModel) -> None:
    prompt = _prompt(12)
    answer = _tokens(list(model.generate(prompt, sampling=GREEDY, max_new_tokens=5, stop_on_eos=False)))
    model.generator.eos_token_ids = frozenset({answer[2]})
    events = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=5, answer_prefix=answer[:3]))
    done = _finished(events)
    assert done.reason == "eos" and done.token_ids == tuple(answer[:2]) and done.generated_tokens == 0
    assert not _tokens(events)


def test_a_stop_string_in_the_prefix_ends_the_answer(model: llmchat.LoadedModel) -> None:
    prompt = _prompt(12)
    first = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=6, stop_on_eos=False))
    answer, text = _tokens(first), _finished(first).text
    stop = model.tokenizer.decode(answer[:3])[-2:]
    assert stop.strip(), "the tiny model's first tokens should end in visible text"
    events = list(
        model.generate(prompt, sampling=GREEDY, max_new_tokens=6, stop_strings=[stop], answer_prefix=answer[:3])
    )
    done = _finished(events)
    # the stream decoder may hold the prefix's last characters back until one more token shows them
    assert done.reason == "stop_string" and len(_tokens(events)) <= 1
    assert stop not in done.text and text.startswith(done.text)


def test_step_logits_reread_any_cached_step_and_leave_the_cache_alone(model: llmchat.LoadedModel) -> None:
    """The logits of every step of the last answer, read back after it finished, are the ones the
    step sampled from (greedy: their argmax is the token); the cache's tensors are unchanged."""
    prompt = _prompt(12)
    events = list(model.generate(prompt, sampling=GREEDY, max_new_tokens=8, stop_on_eos=False))
    answer = _tokens(events)
    steps = [e for e in events if isinstance(e, TokenEvent)]
    keys, values, tokens = model.cache.keys.clone(), model.cache.values.clone(), list(model.cache.tokens)
    for i, step in enumerate(steps):
        logits = model.generator.step_logits(prompt + answer[:i])
        assert int(logits.argmax()) == answer[i]
        assert float(logits.softmax(-1)[answer[i]]) == pytest.approx(step.prob, abs=1e-6)
        fresh = model.logits(prompt + answer[:i])[-1]  # an independent full forward pass
        assert torch.allclose(logits, fresh, atol=1e-4)
    assert torch.equal(model.cache.keys[:, :, : len(tokens)], keys[:, :, : len(tokens)])
    assert torch.equal(model.cache.values[:, :, : len(tokens)], values[:, :, : len(tokens)])
    assert model.cache.tokens == tokens
    with pytest.raises(ValueError, match="no longer in the KV cache"):
        model.generator.step_logits([1, 2, 3] + prompt)


def test_reusable_is_what_a_request_reuses(model: llmchat.LoadedModel) -> None:
    prompt = _prompt(12)
    list(model.generate(prompt, sampling=GREEDY, max_new_tokens=3))
    extended = [*model.cache.tokens, 7, 8]
    expected = model.generator.reusable(extended)
    assert expected == len(model.cache.tokens)
    assert model.generator.reusable(prompt) == len(prompt) - 1  # the last token always runs
    done = next(e for e in model.generate(extended, sampling=GREEDY, max_new_tokens=1) if isinstance(e, PrefillDone))
    assert done.reused_tokens == expected


def test_step_logits_of_another_branch_prefill_it_back_when_asked(model: llmchat.LoadedModel) -> None:
    """After another answer replaced it in the cache, a step of the first answer is out of reach,
    unless prefill=True puts its tokens back (as the next request on that branch would)."""
    prompt = _prompt(12)
    first = _tokens(list(model.generate(prompt, sampling=GREEDY, max_new_tokens=6, stop_on_eos=False)))
    other = _prompt(9, seed=5)
    list(model.generate(other, sampling=GREEDY, max_new_tokens=4))
    sequence = prompt + first[:4]
    with pytest.raises(ValueError, match="no longer in the KV cache"):
        model.generator.step_logits(sequence)
    logits = model.generator.step_logits(sequence, prefill=True)
    assert int(logits.argmax()) == first[4]
    assert torch.allclose(logits, model.logits(sequence)[-1], atol=1e-4)
    assert model.cache.tokens == sequence[:-1]
    assert torch.equal(model.generator.step_logits(sequence), logits)  # now cached: no prefill needed


# --- equal logits: one order everywhere ----------------------------------------------------------


class _FixedLogits:
    """Stands in for the Transformer: every position gets the same hand-made logits."""

    device = torch.device("cpu")

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, ids: torch.Tensor, cache: KVCache, start: int, **_: object) -> torch.Tensor:
        return self.logits.expand(ids.shape[0], -1).clone()


def test_equal_logits_have_one_order_in_generate_the_inspector_and_the_policy_view(
    model: llmchat.LoadedModel,
) -> None:
    """Highest first, equal logits by lowest id — for the step's top-k list, its rank, greedy's pick
    and the policy view — whether or not the k-th place splits a group of equal logits."""
    from llmchat.engine.generate import Generator
    from llmchat.engine.inspector import policy_view

    logits = torch.full((model.config.vocab_size,), -2.0)
    logits[[90, 12, 40]] = 6.0  # three equal at the top, listed out of order
    logits[[7, 3]] = 4.0

    def step(prompt: list[int], sampling: llmchat.SamplingParams, k: int) -> TokenEvent:
        generator = Generator(_FixedLogits(logits), KVCache(1, 1, 4, 32), model.tokenizer)
        events = list(generator.generate(prompt, sampling=sampling, max_new_tokens=1, stop_on_eos=False, top_k=k))
        (event,) = [e for e in events if isinstance(e, TokenEvent)]
        return event

    for k, expected in ((3, [12, 40, 90]), (2, [12, 40]), (4, [12, 40, 90, 3]), (5, [12, 40, 90, 3, 7])):
        event = step([5, 6], GREEDY, k)  # k = 2 and 4 cut a group of equal logits: the exact path
        assert [t.token_id for t in event.top] == expected, k
        assert (event.token_id, event.rank) == (12, 0)
        assert [t.logit for t in event.top] == [float(logits[i]) for i in expected]
    # A penalty on 12 and 40 (in the prompt) makes greedy pick 90: by the raw logits it ranks third.
    penalized = GREEDY.replace(repetition_penalty=2.0)
    event = step([12, 40], penalized, 4)
    assert (event.token_id, event.rank) == (90, 2)
    assert [t.token_id for t in event.top] == [12, 40, 90, 3]
    view = policy_view(logits, penalized, model.tokenizer.token_text, context_ids=[12, 40], top=4, chosen_id=90)
    assert [c.token_id for c in view.candidates] == [t.token_id for t in event.top]
    assert view.prob(90) == 1.0 and view.prob(12) == 0.0  # greedy's one-hot, after the penalty


# --- sliding windows: rings, and the bill ---------------------------------------------------------


def test_sliding_layers_keep_a_ring_and_the_bill_says_so(
    tiny_model: TinyModelFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 3's sliding layers (window 8) hold window + slack slots, its full layer the context; the
    KV panel's numbers, `vram`'s bill and what is allocated agree, and the peak is the sum shown."""
    import llmchat.engine.kv_cache as kv_cache
    from llmchat.cli import main

    monkeypatch.setattr(kv_cache, "RING_SLACK", 4)
    folder = tiny_model("gemma3")
    model = llmchat.load(folder, device="cpu", dtype="float32", context_length=64)
    cache, config = model.cache, model.config
    per_position = 2 * config.num_kv_heads * config.head_dim * 4  # one layer's key and value, float32
    assert (cache.ring, cache.ring_keys.shape[0], cache.keys.shape[0]) == (12, 2, 1)
    assert cache.nbytes == per_position * (64 + 2 * 12)
    events = list(model.generate(_prompt(30), sampling=GREEDY, max_new_tokens=5, stop_on_eos=False))
    done = _finished(events)
    assert done.cache_tokens == 34 and done.cache_bytes == cache.used_bytes == per_position * (34 + 2 * 12)

    assert main(["vram", str(folder), "--device", "cpu", "--context", "64", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["estimates"]
    assert row["kv_cache"] == cache.nbytes and row["kv_cache_windowed"] == per_position * (64 + 2 * 8)
    serving = row["kv_cache"] + row["activations"]
    assert row["total"] == row["weights"] + row["runtime"] + max(serving, row["load_transient"])
    assert main(["vram", str(folder), "--device", "cpu", "--context", "64"]) == 0
    text = capsys.readouterr().out
    assert "a ring of its last 8 + 4 positions" in text and "every position" not in text
    header = next(line for line in text.splitlines() if line.split()[:1] == ["context"])
    assert header.split()[-4:] == ["loading", "peak", "peak", "while"]
