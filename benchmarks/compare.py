"""llmchat against transformers (fp32, bf16) on one model folder: prefill, decode and time to first token.

Every engine runs in its own fresh subprocess (llmchat through `python -m llmchat bench`, transformers
through this script's hidden `--worker` mode), one after the other, with the same thread count,
prompt length and number of greedy tokens. A failing engine shows its error in the table and the
others still run. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("llmchat", "llmchat-fp32", "llmchat-bf16", "transformers-fp32", "transformers-bf16")
DEFAULT_ENGINES = ("llmchat", "transformers-fp32", "transformers-bf16")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class Result:
    """One engine's numbers, or the reason it has none."""

    engine: str
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    ttft_s: float | None = None
    peak_memory_bytes: int | None = None
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# transformers worker (runs in its own process)


def _timed_greedy(model: Any, prompt: Any, gen_tokens: int, cache_kw: str) -> tuple[float, float]:
    """Greedy-generate `gen_tokens` tokens with a manual DynamicCache loop; return (prefill_s, decode_s)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    logits = model(prompt, use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    first = time.perf_counter()
    for _ in range(gen_tokens - 1):
        logits = model(token, use_cache=True, **{cache_kw: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
    end = time.perf_counter()
    return first - start, end - first


def run_transformers_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model with transformers in `args.worker` dtype and time prefill and decode."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.worker)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    vocab = [i for i in range(model.config.vocab_size) if i not in special]
    rng = random.Random(args.seed)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prompt(length: int) -> torch.Tensor:
        return torch.tensor([[rng.choice(vocab) for _ in range(length)]])

    with torch.inference_mode():
        _timed_greedy(model, prompt(min(32, args.prompt_tokens)), 4, cache_kw)  # warm-up
        runs = [_timed_greedy(model, prompt(args.prompt_tokens), args.gen_tokens, cache_kw) for _ in range(args.repeat)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "prefill_tok_s": round(max(args.prompt_tokens / prefill for prefill, _ in runs), 2),
        "decode_tok_s": round(max((args.gen_tokens - 1) / decode for _, decode in runs), 2),
        "ttft_s": round(min(prefill for prefill, _ in runs), 4),
        "peak_memory_bytes": peak if sys.platform == "darwin" else peak * 1024,
        "device": "cpu",
        "dtype": args.worker,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# driver


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _run_engine(engine: str, args: argparse.Namespace) -> Result:
    """Run one engine in a fresh subprocess and parse the JSON it prints last."""
    kind, _, short_dtype = engine.partition("-")
    sizes = ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    common = [*sizes, "--repeat", str(args.repeat), "--seed", str(args.seed), "--threads", str(args.threads)]
    if kind == "llmchat":
        command = [sys.executable, "-m", "llmchat", "bench", str(args.model), "--device", "cpu", *common, "--json"]
        if short_dtype:
            command += ["--dtype", DTYPES[short_dtype]]
    else:
        command = [sys.executable, __file__, "--worker", DTYPES[short_dtype], "--model", str(args.model), *common]
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return Result(engine, error=f"timed out after {args.timeout} s")
    if proc.returncode != 0:
        reason = _last_line(proc.stderr) or _last_line(proc.stdout) or "no output"
        return Result(engine, error=f"exit code {proc.returncode}: {reason}")
    try:
        data = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError:
        return Result(engine, error=f"no JSON in its output: {_last_line(proc.stdout)!r}")
    fields = {key: data.get(key) for key in Result.__dataclass_fields__ if key not in ("engine", "error")}
    return Result(engine, **fields)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value and base else None


def _rows(results: list[Result]) -> list[dict[str, Any]]:
    """Results as dicts, with the two ratio columns filled in."""
    by_name = {r.engine: r for r in results if r.error is None}
    fp32_decode = getattr(by_name.get("transformers-fp32"), "decode_tok_s", None)
    bf16_prefill = getattr(by_name.get("transformers-bf16"), "prefill_tok_s", None)
    return [
        {
            **asdict(r),
            "decode_vs_transformers_fp32": _ratio(r.decode_tok_s, fp32_decode),
            "prefill_vs_transformers_bf16": _ratio(r.prefill_tok_s, bf16_prefill),
        }
        for r in results
    ]


def _markdown(rows: list[dict[str, Any]]) -> str:
    def num(value: float | None, digits: int, suffix: str = "") -> str:
        return "–" if value is None else f"{value:.{digits}f}{suffix}"

    lines = [
        "| engine | prefill tok/s | decode tok/s | TTFT s | ratio vs transformers fp32 decode "
        "| ratio vs transformers bf16 prefill |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        name = row["engine"] + (f" ({row['dtype']})" if row["dtype"] else "")
        if row["error"]:
            error = row["error"].replace("|", "\\|")
            lines.append(f"| {name} | error: {error} | – | – | – | – |")
            continue
        lines.append(
            f"| {name} | {num(row['prefill_tok_s'], 1)} | {num(row['decode_tok_s'], 1)} "
            f"| {num(row['ttft_s'], 3)} | {num(row['decode_vs_transformers_fp32'], 2, 'x')} "
            f"| {num(row['prefill_vs_transformers_bf16'], 2, 'x')} |"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=None, help="Hugging Face model folder (default: the demo model)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per engine; the best is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: torch's default")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma-separated, from {ENGINES}")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per engine")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    parser.add_argument("--worker", choices=sorted(DTYPES.values()), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {ENGINES}")
    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.repeat < 1:
        parser.error("--prompt-tokens must be >= 1, --gen-tokens >= 2, --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(run_transformers_worker(args)))
        return 0
    if args.model is None:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.demo_model import DemoModelUnavailable, demo_hf_folder

        try:
            args.model = demo_hf_folder()
        except DemoModelUnavailable as error:
            print(f"compare.py: the demo model is unavailable ({error}); pass --model PATH", file=sys.stderr)
            return 2
    if not (args.model / "config.json").is_file():
        print(f"compare.py: {args.model} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
        return 2
    import torch
    import transformers

    header = {
        "model": str(args.model),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeat": args.repeat,
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if not args.json:
        for key, value in header.items():
            print(f"{key}: {value}")
        print(flush=True)
    results = []
    for engine in args.engines:
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        results.append(_run_engine(engine, args))
    rows = _rows(results)
    if args.json:
        print(json.dumps({**header, "results": rows}, indent=2))
    else:
        print(_markdown(rows))
        mismatched = [row["engine"] for row in rows if row["threads"] not in (None, args.threads)]
        if mismatched:
            print(f"\nwarning: {mismatched} did not run with {args.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
