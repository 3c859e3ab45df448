"""What the layer views cost, and that ordinary decoding does not pay for them.

The views (engine/inside.py: logit lens, attention, experts, recurrent state, the prompt heatmap)
install their hooks for the one pass that computes them and remove them after. This script checks
both halves of that promise on a real model, every measurement in its own process, interleaved
A B A B, medians of the per-round ratios:

- `plain`: greedy decode of N tokens after the prompt, nothing else in the process;
- `viewed`: the same, in a process that first computed every layer view of a step and the prompt
  heatmap on the same model (so any hook or buffer they left behind would slow it down).

The `viewed` process also times one view of a step (a re-read over the KV cache) against one decode
step, and the prompt heatmap against one prefill of the prompt (the issue's "about one decode step",
"about one prefill").

    python benchmarks/layer_views.py [--model demo] [--rounds 3] [--tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

QUESTION = "What is the capital of France? Tell me three things to see there."


def worker(model_spec: str, kind: str, tokens: int) -> dict[str, Any]:
    """One measurement in this process (run as a child)."""
    from llmchat.engine import SamplingParams, load
    from llmchat.engine.inside import inside_step, prompt_heatmap
    from llmchat.models import resolve_model
    from llmchat.paths import cache_dir

    model = load(resolve_model(model_spec), cache_dir=cache_dir() / "packed")
    ids = model.tokenizer.encode(
        model.template.render([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    )
    greedy = SamplingParams(temperature=0)
    result: dict[str, Any] = {}
    if kind == "viewed":
        *_, first = model.generate(ids, sampling=greedy, max_new_tokens=16, stop_on_eos=False)
        sequence = ids + list(first.token_ids[:8])
        inside_step(model.generator, sequence, first.token_ids[8])  # warm
        began = time.perf_counter()
        inside_step(model.generator, sequence, first.token_ids[8])
        result["view_ms"] = (time.perf_counter() - began) * 1000
        result["decode_step_ms"] = first.decode_seconds / max(first.generated_tokens - 1, 1) * 1000
        began = time.perf_counter()
        prompt_heatmap(model.generator, ids)
        result["heatmap_ms"] = (time.perf_counter() - began) * 1000
        model.reset()
        *_, cold = model.generate(ids, sampling=greedy, max_new_tokens=1, stop_on_eos=False)
        result["prefill_ms"] = cold.prefill_seconds * 1000
        model.reset()
    *_, done = model.generate(ids, sampling=greedy, max_new_tokens=tokens, stop_on_eos=False)
    result["decode_tok_s"] = done.decode_tokens_per_second
    result["answer"] = list(done.token_ids)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=("plain", "viewed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.tokens)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "viewed": []}
    ratios = []
    for _ in range(args.rounds):
        for kind in runs:  # A B, A B: each in a fresh process
            out = subprocess.run(
                [sys.executable, __file__, "--worker", kind, "--model", args.model, "--tokens", str(args.tokens)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        ratios.append(runs["viewed"][-1]["decode_tok_s"] / runs["plain"][-1]["decode_tok_s"])
    viewed = runs["viewed"]
    result = {
        "model": args.model,
        "decode_tok_s": {kind: statistics.median(r["decode_tok_s"] for r in rs) for kind, rs in runs.items()},
        "viewed_over_plain": statistics.median(ratios),
        "same_answer": all(r["answer"] == runs["plain"][0]["answer"] for rs in runs.values() for r in rs),
        "view_ms": statistics.median(r["view_ms"] for r in viewed),
        "decode_step_ms": statistics.median(r["decode_step_ms"] for r in viewed),
        "heatmap_ms": statistics.median(r["heatmap_ms"] for r in viewed),
        "prefill_ms": statistics.median(r["prefill_ms"] for r in viewed),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    tok_s = result["decode_tok_s"]
    print(f"decode, plain process:              {tok_s['plain']:6.1f} tok/s (median of {args.rounds})")
    print(f"decode, after the views in-process: {tok_s['viewed']:6.1f} tok/s")
    print(
        f"viewed / plain (median of per-round ratios): {result['viewed_over_plain']:.2f}; same greedy answer: "
        f"{result['same_answer']}"
    )
    print(f"one step's layer views: {result['view_ms']:.1f} ms (a decode step: {result['decode_step_ms']:.1f} ms)")
    print(f"prompt heatmap: {result['heatmap_ms']:.1f} ms (a prefill of the prompt: {result['prefill_ms']:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
