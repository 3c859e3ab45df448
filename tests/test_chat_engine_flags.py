"""The chat command's engine flags (the same definition as `run`'s) reach the loaded model, and a
branched answer stays within --max-new-tokens (its kept tokens count)."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType

from llmchat.cli import build_parser, main
from llmchat.engine import SamplingParams, load
from llmchat.engine.events import Finished, TokenEvent
from llmchat.tui.app import LLMChatApp
from llmchat.tui.screens.branch import BranchScreen
from llmchat.tui.widgets.messages import AssistantMessage
from llmchat.tui.widgets.panels import TopKPanel
from tests.gguf_export import export_gguf
from tests.test_tui_actions import GREEDY, MAX_NEW, SIZE, _app, _loaded, _send, _store, _until
from tests.tiny_models import build_tiny_model

ENGINE_FLAGS = {"--device", "--dtype", "--context", "--threads", "--prefill-chunk", "--dequantize"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("flags") / "llama")


@pytest.fixture(scope="module")
def quantized(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flags-gguf") / "tiny.Q4_0.gguf"
    return export_gguf(folder, out, qtype=GGMLQuantizationType.Q4_0)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_the_chat_and_run_have_the_same_engine_flags() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("run", "inspect", "bench", "perplexity"):
        assert _flags(sub.choices[command]) >= ENGINE_FLAGS, command
    assert _flags(parser) >= ENGINE_FLAGS


def test_chat_flags_reach_the_app(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_run_app(path: Path, **options: Any) -> None:
        seen.update(options, path=path)

    monkeypatch.setattr("llmchat.tui.app.run_app", fake_run_app)
    code = main(
        ["--model", str(folder), "--context", "64", "--threads", "1", "--device", "cpu", "--dtype", "float32",
         "--prefill-chunk", "16", "--dequantize", "--raw", "--max-new-tokens", "5", "--temperature", "0",
         "--min-p", "0.1"]
    )  # fmt: skip
    assert code == 0
    assert seen["path"] == folder
    assert (seen["context_length"], seen["threads"], seen["device"], seen["dtype"]) == (64, 1, "cpu", "float32")
    assert (seen["prefill_chunk"], seen["packed"], seen["completion"]) == (16, False, True)
    assert seen["max_new_tokens"] == 5 and seen["sampling_overrides"] == {"temperature": 0.0, "min_p": 0.1}

    seen.clear()
    assert main(["--model", str(folder)]) == 0
    assert seen["context_length"] is None and seen["packed"] is None and seen["completion"] is False


def _threads_of_a_new_thread() -> int:
    """torch's thread count as a thread started now sees it (each thread reads the process-wide
    setting when it first runs torch; the test's own thread keeps the one it started with)."""
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return seen[0]


async def test_the_app_loads_with_the_engine_options(folder: Path, tmp_path: Path) -> None:
    """A smaller KV cache, a prefill chunk size and a thread count are what the chat's model gets."""
    threads = torch.get_num_threads()
    app = LLMChatApp(
        folder, store=_store(tmp_path), sampling=GREEDY, max_new_tokens=MAX_NEW, device="cpu", dtype="float32",
        context_length=96, prefill_chunk=4, threads=1,
    )  # fmt: skip
    try:
        async with app.run_test(size=SIZE) as pilot:
            await _loaded(pilot, app)
            model = app.model
            assert model is not None
            assert model.context_length == model.cache.capacity == 96 and model.generator.prefill_chunk == 4
            answer = await _send(pilot, app, "the quick brown fox jumps over the lazy dog")
            done = answer.finished
            assert done is not None and len(done.prefill_chunks) == -(-done.prefilled_tokens // 4)
            assert _threads_of_a_new_thread() == 1  # what the model's worker threads run with
    finally:
        torch.set_num_threads(threads)


async def test_dequantize_reaches_the_app(quantized: Path, tmp_path: Path) -> None:
    """--dequantize (packed=False): the GGUF's quantized matrices are float, not kept packed."""
    app = _app(quantized, tmp_path, packed=False)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        assert app.model is not None and app.model.info.plan == {}
    packed = load(quantized, device="cpu", dtype="float32", context_length=64)
    assert packed.info.plan  # without it the same file keeps them packed on this CPU


# --- a branch and --max-new-tokens -------------------------------------------------------------------


def test_a_branched_answer_counts_its_kept_tokens(folder: Path) -> None:
    """answer_prefix tokens count toward max_new_tokens: a prefix of 5 with a limit of 8 adds 3;
    a prefix as long as the limit adds none."""
    model = load(folder, device="cpu", dtype="float32", context_length=128)
    prompt = model.tokenizer.encode("the quick brown fox", add_special_tokens=True)
    greedy = SamplingParams(temperature=0)
    *_, first = model.generate(prompt, sampling=greedy, max_new_tokens=10, stop_on_eos=False)
    assert isinstance(first, Finished) and len(first.token_ids) == 10
    for prefix_length, limit in ((5, 8), (8, 8), (10, 8)):
        prefix = list(first.token_ids[:prefix_length])
        events = list(
            model.generate(prompt, sampling=greedy, max_new_tokens=limit, stop_on_eos=False, answer_prefix=prefix)
        )
        done = events[-1]
        assert isinstance(done, Finished)
        new = [e for e in events if isinstance(e, TokenEvent)]
        assert len(new) == done.generated_tokens == max(limit - prefix_length, 0)
        assert done.token_ids == tuple(first.token_ids[: max(limit, prefix_length)])  # greedy: the same text
        assert done.reason == "max_new_tokens" and done.prefix_tokens == prefix_length


async def test_a_branch_in_the_chat_stays_within_max_new_tokens(folder: Path, tmp_path: Path) -> None:
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        old = await _send(pilot, app, "hello there")
        assert len(old.tokens) >= 8
        for _ in range(len(old.tokens) - 4):
            await pilot.press("f8")
        await _until(pilot, lambda: app.query_one(TopKPanel).event is old.tokens[4], "the cursor at token 4")
        await pilot.press("ctrl+b")
        await _until(pilot, lambda: isinstance(app.screen, BranchScreen), "the branch dialog")
        await pilot.press("enter")
        await _until(pilot, lambda: app.conversation.current != old.message_id and not app.generating, "the branch")
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "the new answer")
        branch = app.query(AssistantMessage).last()
        done = branch.finished
        assert done is not None and done.prefix_tokens == 5
        assert len(branch.tokens) <= MAX_NEW
        if done.reason == "max_new_tokens":
            assert len(branch.tokens) == MAX_NEW and done.generated_tokens == MAX_NEW - 5
