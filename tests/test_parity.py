"""Reference parity: llmchat's engine against transformers on tiny random-weight models.

For every kind in `tiny_models.KINDS`, in both config.json styles (and two sharded folders): the
logits of a 40-token input agree within `TOL`, 20 greedy tokens are those of transformers'
`generate`, and reusing the KV cache of a previous turn gives the answer a fresh prefill gives.

llmchat is imported by a fixture so that the tiny-model self-check runs without the engine.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

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


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matmuls run fastest on one thread (on a busy 2-core box, ten times faster than on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def _vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def _random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_model(folder: Path) -> PreTrainedModel:
    """A fresh transformers model: dynamic RoPE keeps state between calls, so none is shared."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _hf_logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _hf_greedy(model: PreTrainedModel, prompt: list[int]) -> list[int]:
    """Greedy tokens of `generate`; `eos_token_id=None` turns EOS stopping off without touching logits
    (`min_new_tokens` would instead mask EOS out of the argmax)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


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

    ids = _random_ids(LOGITS_LEN, new_config["vocab_size"], seed=1)
    models = [_hf_model(folder) for folder in (new, old, sharded)]
    reference = _hf_logits(models[0], ids)
    assert torch.isfinite(reference).all() and reference.std() > 1.0, "logits too flat for greedy parity"
    for model in models[1:]:
        assert getattr(model.config, "layer_types", None) == getattr(models[0].config, "layer_types", None)
        assert getattr(model.config, "sliding_window", None) == getattr(models[0].config, "sliding_window", None)
        assert torch.equal(_hf_logits(model, ids), reference), f"{kind}: styles/sharding load differently"


@pytest.mark.parametrize(("kind", "style", "sharded"), CASES)
def test_logits_match_transformers(
    kind: str, style: str, sharded: bool, tiny_model: TinyModelFactory, api: ModuleType
) -> None:
    """A 40-token forward gives the logits of transformers."""
    folder = tiny_model(kind, style, sharded)
    ids = _random_ids(LOGITS_LEN, _vocab_size(folder), seed=1)
    expected = _hf_logits(_hf_model(folder), ids)
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
    prompt = _random_ids(PROMPT_LEN, _vocab_size(folder), seed=2)
    expected = _hf_greedy(_hf_model(folder), prompt)
    assert len(expected) == NEW_TOKENS
    model = api.load(folder, device="cpu", dtype="float32")
    got = _tokens(events, _greedy(api, model, prompt, NEW_TOKENS))
    if got != expected:
        # Where it went wrong: the full-forward logits over the reference answer.
        full = prompt + expected
        diff = (model.logits(full) - _hf_logits(_hf_model(folder), full)).abs().max().item()
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
    vocab = _vocab_size(folder)
    model = api.load(folder, device="cpu", dtype="float32")
    prompt1 = _random_ids(10, vocab, seed=3)
    turn1 = _greedy(api, model, prompt1, 6)
    assert _prefill_done(events, turn1).reused_tokens == 0, f"{_label(kind, 'new')}: a fresh model reused tokens"
    prompt2 = prompt1 + _tokens(events, turn1) + _random_ids(6, vocab, seed=4)
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
