"""Decode speed inside the chat TUI against the bare engine, measured side by side in one run.

The TUI must not slow the model down: rendering is coalesced to at most 10 frames a second (fewer
when the UI thread is busy) and the worker thread owns the model. This script answers the same
greedy prompt several ways, one after the other, in one process:

1. `engine`: `LoadedModel.generate()` drained in a loop (what `llmchat bench` times),
2. `tui-headless`: the real app under Textual's headless driver (layout and rendering run, no
   terminal output), prompt sent with Pilot,
3. `tui-typing`: the same, with keys typed into the prompt while the answer streams,
4. optionally `tui-tmux` (`--tmux`): the installed `llmchat` in a real terminal (tmux), reading the
   stats line the app prints under the answer.

and prints decode tok/s of each with the ratio to the engine. It also checks that the input stays
responsive while an answer streams: it types into the prompt mid-answer and reports how long the
keystrokes took to show up.

    python benchmarks/tui_speed.py                     # demo model
    python benchmarks/tui_speed.py --model PATH --tmux --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPED = "hello"  # typed into the input mid-answer
PROMPT = "Write a long story about a dragon who learns to bake bread. Use many details."


def engine_run(model: Any, max_new_tokens: int, top_k: int) -> dict[str, float]:
    from llmchat.engine import SamplingParams

    model.reset()
    ids = model.tokenizer.encode(
        model.template.render([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    )
    *_, done = model.generate(ids, sampling=SamplingParams(temperature=0), max_new_tokens=max_new_tokens, top_k=top_k)
    return {"tokens": done.generated_tokens, "decode_tok_s": done.decode_tokens_per_second, **_threads(model)}


def _threads(model: Any) -> dict[str, int]:
    """The thread count decode ended on and the governor's switches so far (engine/threads.py)."""
    governor = model.generator.threads
    return {} if governor is None else {"decode_threads": governor.threads, "thread_switches": governor.switches}


async def tui_run(
    path: Path, max_new_tokens: int, store_dir: Path, typing: bool, share: float | None = None
) -> dict[str, Any]:
    from textual import events

    from llmchat.chat.store import ConversationStore
    from llmchat.engine import SamplingParams
    from llmchat.tui.app import LLMChatApp
    from llmchat.tui.widgets.messages import AssistantMessage
    from llmchat.tui.widgets.prompt import PromptInput

    app = LLMChatApp(
        path,
        store=ConversationStore(store_dir),
        sampling=SamplingParams(temperature=0),
        max_new_tokens=max_new_tokens,
    )
    if share is not None:
        app.frames.share = share
    frames = [0]
    app.frames.observe = _counting(app.frames.observe, frames)  # type: ignore[method-assign]
    async with app.run_test(size=(160, 48)) as pilot:
        while app.model is None:
            await asyncio.sleep(0.05)
        prompt = app.query_one(PromptInput)
        prompt.text = PROMPT
        await pilot.press("enter")
        # Mid-answer, type into the input and time how long the keystrokes take to land. Keys are
        # posted as the terminal driver posts them (Pilot's press() waits for an idle CPU, which a
        # running model never gives it).
        latencies: list[float] = []
        while typing and (not app.query(AssistantMessage) or len(app.query(AssistantMessage).last().tokens) < 20):
            await asyncio.sleep(0.01)
        prompt.text = ""
        for char in TYPED if typing else "":
            before = prompt.text
            started = time.perf_counter()
            app.post_message(events.Key(char, char))
            while prompt.text == before and time.perf_counter() - started < 5:
                await asyncio.sleep(0.005)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.2)  # a brisk typist
        landed = prompt.text == TYPED
        await asyncio.sleep(0.2)  # the answer may not have begun yet when nothing is typed
        while app.generating:
            await asyncio.sleep(0.05)
        done = app.query(AssistantMessage).last().finished
        assert done is not None
        result: dict[str, Any] = {"tokens": done.generated_tokens, "decode_tok_s": done.decode_tokens_per_second}
        result.update(_threads(app.model))
        decode = done.decode_seconds + done.ttft_seconds
        result["frames_per_s"] = round(frames[0] / decode, 1) if decode > 0 else 0.0
        if typing:
            result["typing_ms_per_key"] = sum(latencies) / max(len(latencies), 1) * 1000
            result["typing_ms_worst"] = max(latencies, default=0) * 1000
            result["typed_text_landed"] = landed
        return result


# --frames: what one UI frame costs as the answer grows, on text streamed at a fixed rate (no model
# work, so the UI thread's CPU time is the UI's alone). Two shapes: a story (paragraphs: Markdown
# blocks finish as it goes) and a poem without blank lines (one block that never finishes, the
# worst case for a renderer that lays out the whole growing block again).
STORY = (
    "The dragon woke before the sun and padded down to the village bakery, where the old baker "
    "kept the ovens warm through the night. She watched the dough rise, folded it with her claws, "
    "and learned that patience mattered more than fire. "
)
POEM = "In the depths of the blue, the sea abides,\nand the lanterns of the harbour sway,\n"


def synthetic_pieces(shape: str, count: int) -> list[str]:
    """`count` token-sized pieces of a story (a paragraph every ~70 tokens) or a poem (lines only)."""
    pieces: list[str] = []
    while len(pieces) < count:
        if shape == "story":
            words = STORY.split(" ")
            pieces += [(" " if pieces and not pieces[-1].endswith("\n") else "") + w for w in words if w]
            pieces.append("\n\n")
        else:
            for line in POEM.splitlines(keepends=True):
                words = line.split(" ")
                pieces += [words[0]] + [" " + w for w in words[1:]]
    return pieces[:count]


def synthetic_events(pieces: list[str], rate: float, top_k: int) -> Any:
    """Engine events for `pieces`, one token each `1 / rate` seconds (sleeping: no CPU used)."""
    from llmchat.engine.events import Finished, PrefillDone, TokenEvent, TopToken

    yield PrefillDone(prompt_tokens=40, reused_tokens=0, prefilled_tokens=40, seconds=0.01,
                      tokens_per_second=4000.0, cache_tokens=40, cache_bytes=40 * 1024)  # fmt: skip
    started = time.perf_counter()
    for i, piece in enumerate(pieces):
        time.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
        top = tuple(TopToken(1000 + k, f"{piece}{k}" if k else piece, 10.0 - k, 0.6 / (k + 1), 0.6 / (k + 1))
                    for k in range(top_k))  # fmt: skip
        yield TokenEvent(token_id=1000, text=piece, index=i, logit=10.0, prob=0.6, policy_prob=0.6, rank=0,
                         top=top, seconds=1 / rate, cache_tokens=41 + i, cache_bytes=(41 + i) * 1024,
                         content=piece, entropy=1.0)  # fmt: skip
    text = "".join(pieces)
    yield Finished(reason="max_new_tokens", prompt_tokens=40, reused_tokens=0, prefilled_tokens=40,
                   generated_tokens=len(pieces), prefill_seconds=0.01, decode_seconds=len(pieces) / rate,
                   ttft_seconds=0.02, text=text, content=text, token_ids=(1000,) * len(pieces),
                   cache_tokens=40 + len(pieces), cache_bytes=(40 + len(pieces)) * 1024)  # fmt: skip


async def frames_run(
    path: Path, shape: str, tokens: int, rate: float, store_dir: Path, share: float | None = None
) -> dict[str, Any]:
    """Stream `tokens` synthetic tokens into the real app; frames/s and UI ms per frame by answer length."""
    from llmchat.chat.store import ConversationStore
    from llmchat.engine import SamplingParams
    from llmchat.tui.app import TOP_K_SHOWN, GenerationUpdate, LLMChatApp
    from llmchat.tui.widgets.prompt import PromptInput

    marks: list[tuple[int, float, float]] = []  # (tokens shown so far, UI thread CPU s, wall s) per frame

    class Measured(LLMChatApp):
        async def on_generation_update(self, message: GenerationUpdate) -> None:
            # Runs before LLMChatApp's handler (Textual calls each class's in MRO order): the CPU
            # time between two marks is one whole frame (handling, layout, repaint).
            shown = len(self._answer.tokens) if self._answer is not None else 0  # (a query costs ~1 ms)
            marks.append((shown, time.thread_time(), time.perf_counter()))

    app = Measured(path, store=ConversationStore(store_dir), sampling=SamplingParams(temperature=0))
    if share is not None:  # --share: the frame budget's CPU share (1 = no budget: the fastest rate)
        app.frames.share = share
    pieces = synthetic_pieces(shape, tokens)
    async with app.run_test(size=(160, 48)) as pilot:
        while app.model is None:
            await asyncio.sleep(0.05)
        app.model.generate = lambda *a, **k: synthetic_events(pieces, rate, TOP_K_SHOWN)  # type: ignore[method-assign]
        app.query_one(PromptInput).text = PROMPT
        await pilot.press("enter")
        await asyncio.sleep(0.5)
        while app.generating:
            await asyncio.sleep(0.05)
    result: dict[str, Any] = {"shape": shape, "tokens": tokens, "rate_tok_s": rate}
    for at in (100, 1000):
        window = [m for m in marks if at - 50 <= m[0] <= at + 50]
        if len(window) >= 3:
            frames = len(window) - 1
            result[f"at_{at}"] = {
                "frames_per_s": round(frames / (window[-1][2] - window[0][2]), 1),
                "ui_ms_per_frame": round((window[-1][1] - window[0][1]) / frames * 1000, 1),
                "ui_share": round((window[-1][1] - window[0][1]) / (window[-1][2] - window[0][2]), 3),
            }
    return result


def _counting(observe: Callable[[], float], frames: list[int]) -> Callable[[], float]:
    """`FrameBudget.observe`, counting the frames (the app calls it once per batch it draws)."""

    def counted() -> float:
        frames[0] += 1
        return observe()

    return counted


def tmux_run(path: Path, max_new_tokens: int, home: Path) -> dict[str, float]:
    """The installed app in a real terminal; the stats line under the answer has its tok/s."""
    exe = shutil.which("llmchat") or str(Path(sys.executable).with_name("llmchat"))
    env = f"LLMCHAT_CONFIG_DIR={home}/config LLMCHAT_DATA_DIR={home}/data LLMCHAT_CACHE_DIR={home}/cache"
    session = "llmchat-speed"
    command = f"env {env} {exe} --model {path} --temperature 0 --max-new-tokens {max_new_tokens}"
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "48", command], check=True)
    try:
        pane = ""
        for _ in range(600):
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            if "ctx" in pane and "loading" not in pane:
                break
            time.sleep(0.1)
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", PROMPT], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        for _ in range(1200):
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            match = re.search(r"(\d+) tokens · TTFT [\d.]+ s · ([\d.]+) tok/s", pane)
            if match:
                return {"tokens": int(match.group(1)), "decode_tok_s": float(match.group(2))}
            time.sleep(0.1)
        raise RuntimeError("no stats line in the tmux pane:\n" + pane)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def _in_thread(work: Callable[[], T]) -> T:
    """Run `work` on a fresh thread and return its result (see main())."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder or .gguf (default: the demo model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (each runs every variant once); medians count")
    parser.add_argument("--tmux", action="store_true", help="also run the installed app inside tmux")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--frames", action="store_true", help="instead: UI frames/s and ms per frame at 100 and 1000 tokens"
    )
    parser.add_argument("--rate", type=float, default=30.0, help="--frames: tokens per second streamed")
    parser.add_argument("--share", type=float, help="the frame budget's share of a core (1: unlimited)")
    args = parser.parse_args()
    if args.frames:
        return frames_main(args)

    import llmchat
    from llmchat.tui.app import TOP_K_SHOWN

    path = args.model
    if path is None:
        from llmchat.models import ensure_demo

        path = ensure_demo().path
    # The engine runs in a thread of its own, as in the app, and the main thread never runs torch:
    # once the main thread has run an OpenMP-parallel op, torch kernels called from any other
    # thread run at about half speed (libgomp; measured on the int4 kernel: 180 -> 300 us).
    model = _in_thread(lambda: llmchat.load(path))
    _in_thread(lambda: engine_run(model, 8, TOP_K_SHOWN))  # warm-up
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {"engine": [], "tui-headless": [], "tui-typing": []}
    if args.tmux:
        runs["tui-tmux"] = []
    # Interleaved rounds, medians: this machine's speed drifts by ±20% over minutes, so each variant's
    # ratio to the engine is taken within its round (the engine ran just before it), then the median.
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            runs["engine"].append(_in_thread(lambda: engine_run(model, args.max_new_tokens, TOP_K_SHOWN)))
            store = Path(tmp) / f"store{i}"
            runs["tui-headless"].append(asyncio.run(tui_run(path, args.max_new_tokens, store, False, args.share)))
            runs["tui-typing"].append(asyncio.run(tui_run(path, args.max_new_tokens, store, True, args.share)))
            if args.tmux:
                runs["tui-tmux"].append(tmux_run(path, args.max_new_tokens, Path(tmp) / f"home{i}"))
    engine = [r["decode_tok_s"] for r in runs["engine"]]
    for name, measured in runs.items():
        result = dict(measured[len(measured) // 2])  # a run's other fields (tokens, typing), then medians
        for key in ("decode_tok_s", "frames_per_s", "typing_ms_per_key", "typing_ms_worst"):
            if key in result:
                result[key] = round(statistics.median(r[key] for r in measured), 1)
        if "typed_text_landed" in result:
            result["typed_text_landed"] = all(r["typed_text_landed"] for r in measured)
        ratios = [r["decode_tok_s"] / e for r, e in zip(measured, engine)]
        result["ratio_to_engine"] = round(statistics.median(ratios), 3)
        result["ratios"] = [round(x, 3) for x in ratios]
        result["decode_threads_per_round"] = [r.get("decode_threads") for r in measured]
        results[name] = result
    if args.json:
        print(json.dumps({"model": str(path), "results": results}, indent=2))
    else:
        print(f"model: {path}")
        for name, result in results.items():
            extra = f"  {result['frames_per_s']:.1f} frames/s" if "frames_per_s" in result else ""
            if "typing_ms_per_key" in result:
                extra += f"  typing {result['typing_ms_per_key']:.1f} ms/key, landed={result['typed_text_landed']}"
            print(
                f"{name:<13} {result['tokens']:>4} tokens  {result['decode_tok_s']:6.1f} tok/s"
                f"  ×{result['ratio_to_engine']:.2f} (rounds: {', '.join(f'{x:.2f}' for x in result['ratios'])};"
                f" threads {result['decode_threads_per_round']}){extra}"
            )
    return 0


def frames_main(args: argparse.Namespace) -> int:
    """`--frames`: frame cost against answer length, for a story and a poem, 1,200 tokens each
    (the last frames, which finish the answer, fall outside the windows)."""
    path = args.model
    if path is None:
        from llmchat.models import ensure_demo

        path = ensure_demo().path
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in ("story", "poem"):
            results.append(asyncio.run(frames_run(path, shape, 1200, args.rate, Path(tmp) / shape, args.share)))
    if args.json:
        print(json.dumps({"model": str(path), "frames": results}, indent=2))
        return 0
    print(f"{args.rate:.0f} tok/s streamed, synthetic text, 160x48")
    for result in results:
        for at in (100, 1000):
            row = result.get(f"at_{at}")
            if row:
                print(f"{result['shape']:<6} at {at:>4} tokens: {row['frames_per_s']:5.1f} frames/s"
                      f"  {row['ui_ms_per_frame']:5.1f} ms/frame  UI {row['ui_share']:.1%} of a core")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
