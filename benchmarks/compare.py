"""llmchat against llama-cpp-python and transformers (fp32, bf16): prefill, decode, TTFT, and decode
speed as the context grows — side by side in one run, on one machine.

llmchat and llama-cpp-python run the GGUF file (default: the demo model, SmolLM2-135M-Instruct Q4_1);
transformers runs the float32 Hugging Face folder made from that same file (tests/demo_model.py).
`llmchat-dequantized` is llmchat on the same GGUF with `--dequantize` (float32 weights), the
reference the packed path is checked against. Every engine runs in its own fresh subprocess, one
after the other, with the same thread count, prompt length and number of greedy tokens; a failing
or missing engine (llama-cpp-python is the optional `bench` extra) shows its error in the table and
the others still run. With --contexts each engine also decodes at those context lengths and an SVG
chart of decode tok/s against context length is written. See benchmarks/README.md.

`--rounds N` runs the engines N times interleaved (A B A B ...): the table shows each engine's median
and the ratio columns are medians of the per-round ratios, so a machine that slows down for a while
slows both sides of a ratio. `--background-load K` keeps K single-threaded busy processes running for
the whole run (a user's machine is never idle: one busy core halved some engines' speed and cut
others' tenfold).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("llmchat", "llmchat-dequantized", "llama-cpp-python", "transformers-fp32", "transformers-bf16")
DEFAULT_ENGINES = ENGINES
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
CONTEXT_GEN_TOKENS = 32  # tokens decoded at each context length of a sweep


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
    contexts: list[dict[str, Any]] | None = None  # decode tok/s per context length (--contexts)
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


def _context_row(context: int, timings: tuple[float, float]) -> dict[str, Any]:
    prefill, decode = timings
    return {
        "context_tokens": context,
        "decode_tok_s": round((CONTEXT_GEN_TOKENS - 1) / decode, 2),
        "prefill_tok_s": round(context / prefill, 2),
    }


def run_llama_cpp_worker(args: argparse.Namespace) -> dict[str, Any]:
    """llama-cpp-python on the GGUF: greedy generate(), timed at the first token and at the last."""
    import resource

    from llama_cpp import Llama

    needed = max([args.prompt_tokens + args.gen_tokens, *(n + CONTEXT_GEN_TOKENS for n in args.context_list)])
    llm = Llama(
        model_path=str(args.gguf),
        n_ctx=needed + 8,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    rng = random.Random(args.seed)
    first_id = 256  # past the byte/control tokens of the usual vocabularies

    def prompt(length: int) -> list[int]:
        return [rng.randrange(first_id, llm.n_vocab()) for _ in range(length)]

    def timed(tokens: list[int], gen_tokens: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        first = start
        for count, _ in enumerate(llm.generate(tokens, top_k=1, temp=0.0, reset=True), start=1):
            if count == 1:
                first = time.perf_counter()
            if count >= gen_tokens:
                break
        return first - start, time.perf_counter() - first

    timed(prompt(min(32, args.prompt_tokens)), 4)  # warm-up
    runs = [timed(prompt(args.prompt_tokens), args.gen_tokens) for _ in range(args.repeat)]
    sweep = [_context_row(n, timed(prompt(n), CONTEXT_GEN_TOKENS)) for n in args.context_list]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "prefill_tok_s": round(max(args.prompt_tokens / prefill for prefill, _ in runs), 2),
        "decode_tok_s": round(max((args.gen_tokens - 1) / decode for _, decode in runs), 2),
        "ttft_s": round(min(prefill for prefill, _ in runs), 4),
        "peak_memory_bytes": peak * 1024,
        "device": "cpu",
        "dtype": "gguf",
        "threads": args.threads,
        "contexts": sweep or None,
    }


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
        sweep = [
            _context_row(n, _timed_greedy(model, prompt(n), CONTEXT_GEN_TOKENS, cache_kw)) for n in args.context_list
        ]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "contexts": sweep or None,
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
    kind, _, variant = engine.partition("-")
    sizes = ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    common = [*sizes, "--repeat", str(args.repeat), "--seed", str(args.seed), "--threads", str(args.threads)]
    sweep = ["--contexts", ",".join(map(str, args.context_list))] if args.context_list else []
    if kind == "llmchat":
        command = [sys.executable, "-m", "llmchat", "bench", str(args.gguf), "--device", "cpu", *common, "--json"]
        command += ["--dequantize"] if variant == "dequantized" else []
        command += [*sweep, "--context-gen-tokens", str(CONTEXT_GEN_TOKENS)] if sweep else []
    elif kind == "llama":
        command = [sys.executable, __file__, "--worker", "llama-cpp", "--gguf", str(args.gguf), *common, *sweep]
    else:
        worker = DTYPES[variant]
        command = [sys.executable, __file__, "--worker", worker, "--model", str(args.model), *common, *sweep]
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
    if fields.get("dtype") and "weights" in data and kind == "llmchat":
        fields["dtype"] = "packed" if data["weights"] != "float" else fields["dtype"]
    return Result(engine, **fields)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value and base else None


RATIOS = {  # column: (measure, the engine it is divided by)
    "decode_vs_llama_cpp": ("decode_tok_s", "llama-cpp-python"),
    "prefill_vs_llama_cpp": ("prefill_tok_s", "llama-cpp-python"),
    "decode_vs_transformers_fp32": ("decode_tok_s", "transformers-fp32"),
    "prefill_vs_transformers_bf16": ("prefill_tok_s", "transformers-bf16"),
}
MEASURES = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_memory_bytes")


def _rows(rounds: list[list[Result]]) -> list[dict[str, Any]]:
    """The rounds' results (each a list of the engines' results) as dicts, with the ratio columns filled
    in: each measure is the engine's median and each ratio the median of the per-round ratios; an engine
    that failed in any round shows that round's error."""
    per_round = []
    for results_of_round in rounds:
        by_name = {r.engine: r for r in results_of_round if r.error is None}
        per_round.append(
            {
                r.engine: {
                    column: _ratio(getattr(r, measure), getattr(by_name.get(base), measure, None))
                    for column, (measure, base) in RATIOS.items()
                }
                for r in results_of_round
            }
        )
    rows = []
    for index, last in enumerate(rounds[-1]):
        runs = [results_of_round[index] for results_of_round in rounds]
        failed = next((run for run in runs if run.error is not None), None)
        row = asdict(failed or last)
        if failed is None:
            for measure in MEASURES:
                values = [getattr(run, measure) for run in runs if getattr(run, measure) is not None]
                row[measure] = _median(values)
        for column in RATIOS:
            ratios = [ratios_of_round[last.engine][column] for ratios_of_round in per_round]
            row[column] = None if failed else _median([r for r in ratios if r is not None])
        row["rounds"] = len(runs)
        rows.append(row)
    return rows


def _median(values: list[Any]) -> Any:
    if not values:
        return None
    middle = statistics.median(values)
    return round(middle, 3) if isinstance(middle, float) else middle


@contextlib.contextmanager
def background_load(processes: int) -> Iterator[None]:
    """`processes` single-threaded busy loops running until the block ends (the OS places them)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def _markdown(rows: list[dict[str, Any]]) -> str:
    def num(value: float | None, digits: int, suffix: str = "") -> str:
        return "–" if value is None else f"{value:.{digits}f}{suffix}"

    lines = [
        "| engine | prefill tok/s | decode tok/s | TTFT s | decode × llama.cpp | prefill × llama.cpp "
        "| decode × transformers fp32 | prefill × transformers bf16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        name = row["engine"] + (f" ({row['dtype']})" if row["dtype"] else "")
        if row["error"]:
            error = row["error"].replace("|", "\\|")
            lines.append(f"| {name} | error: {error} | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {name} | {num(row['prefill_tok_s'], 1)} | {num(row['decode_tok_s'], 1)} "
            f"| {num(row['ttft_s'], 3)} | {num(row['decode_vs_llama_cpp'], 2, 'x')} "
            f"| {num(row['prefill_vs_llama_cpp'], 2, 'x')} | {num(row['decode_vs_transformers_fp32'], 2, 'x')} "
            f"| {num(row['prefill_vs_transformers_bf16'], 2, 'x')} |"
        )
    sweeps = [row for row in rows if row.get("contexts")]
    if sweeps:
        contexts = [c["context_tokens"] for c in sweeps[0]["contexts"]]
        lines += ["", "| decode tok/s at context | " + " | ".join(map(str, contexts)) + " |"]
        lines.append("|---|" + "---:|" * len(contexts))
        for row in sweeps:
            values = {c["context_tokens"]: c["decode_tok_s"] for c in row["contexts"]}
            lines.append(f"| {row['engine']} | " + " | ".join(num(values.get(n), 1) for n in contexts) + " |")
    return "\n".join(lines)


COLORS = ("#e4572e", "#29335c", "#17bebb", "#ffc914", "#76b041", "#9c6ade")


def _svg_chart(rows: list[dict[str, Any]], title: str, subtitle: str) -> str:
    """Decode tok/s against context length, one line per engine, as a standalone SVG."""
    series = [(row["engine"], [(c["context_tokens"], c["decode_tok_s"]) for c in row["contexts"]]) for row in rows]
    series = [(name, points) for name, points in series if points]
    width, height, left, right, top, bottom = 720, 420, 70, 190, 50, 60
    xs = sorted({x for _, points in series for x, _ in points})
    step = 10 if max(y for _, points in series for _, y in points) <= 100 else 50
    top_y = math.ceil(max(y for _, points in series for _, y in points) * 1.05 / step) * step
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:  # contexts are spread evenly by rank: 256 ... 4096 read well
        return left + plot_w * (xs.index(x) / max(len(xs) - 1, 1))

    def py(y: float) -> float:
        return top + plot_h * (1 - y / top_y)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="15" font-weight="bold">{title}</text>',
        f'<text x="{left}" y="40" fill="#555">{subtitle}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>',
        f'<text x="{left + plot_w / 2}" y="{height - 18}" text-anchor="middle">context length (tokens)</text>',
        f'<text x="18" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {top + plot_h / 2})">decode tok/s</text>',
    ]
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{x}</text>')
    for i in range(int(top_y // step) + 1):
        y = i * step
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + plot_w}" y2="{py(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
    for index, (name, points) in enumerate(series):
        color = COLORS[index % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2.5"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"/>' for x, y in points]
        legend_y = top + 10 + 22 * index
        out.append(
            f'<line x1="{width - right + 20}" y1="{legend_y}" x2="{width - right + 44}" y2="{legend_y}" '
            f'stroke="{color}" stroke-width="2.5"/>'
        )
        out.append(f'<text x="{width - right + 50}" y="{legend_y + 4}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for llmchat and llama.cpp (default: demo)")
    parser.add_argument("--model", type=Path, default=None, help="HF folder for transformers (default: the demo's)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per engine; the best is reported")
    parser.add_argument("--rounds", type=int, default=1, help="engines run N times interleaved; medians reported")
    parser.add_argument("--background-load", type=int, default=0, metavar="K", help="K busy processes during the run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: torch's default")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma-separated, from {ENGINES}")
    parser.add_argument("--contexts", default="", help="decode-speed sweep, e.g. 256,1024,2048,4096")
    parser.add_argument("--chart", type=Path, default=None, help="SVG of the sweep (default: next to --json output)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per engine")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    parser.add_argument("--redraw", type=Path, default=None, help="redraw the chart from a --json output file")
    parser.add_argument("--worker", choices=[*sorted(DTYPES.values()), "llama-cpp"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {ENGINES}")
    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.repeat < 1 or args.rounds < 1 or args.background_load < 0:
        parser.error(
            "--prompt-tokens must be >= 1, --gen-tokens >= 2, --repeat >= 1, --rounds >= 1, --background-load >= 0"
        )
    try:
        args.context_list = sorted({int(n) for n in args.contexts.split(",") if n.strip()})
    except ValueError:
        parser.error("--contexts takes comma-separated token counts")
    return args


def _demo_paths(args: argparse.Namespace) -> str | None:
    """Fill in the demo GGUF and its float32 folder where no paths were given; an error or None."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.demo_model import DemoModelUnavailable, demo_gguf_file, demo_hf_folder

    try:
        if args.gguf is None:
            args.gguf = demo_gguf_file()
        if args.model is None and any(e.startswith("transformers") for e in args.engines):
            args.model = demo_hf_folder()
    except DemoModelUnavailable as error:
        return f"the demo model is unavailable ({error}); pass --gguf PATH and --model PATH"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.redraw:
        saved = json.loads(args.redraw.read_text(encoding="utf-8"))
        rows = [r for r in saved["results"] if r.get("contexts")]
        title = f"Decode tok/s as the context grows — {Path(saved['gguf']).name}"
        subtitle = f"{saved['date']}, {saved['cpu']} ({saved['cpu_capability']}), {saved['threads']} threads"
        chart = args.chart or REPO_ROOT / "benchmarks" / "decode_vs_context.svg"
        chart.write_text(_svg_chart(rows, title, subtitle), encoding="utf-8")
        return 0
    if args.worker == "llama-cpp":
        print(json.dumps(run_llama_cpp_worker(args)))
        return 0
    if args.worker:
        print(json.dumps(run_transformers_worker(args)))
        return 0
    problem = _demo_paths(args)
    if problem:
        print(f"compare.py: {problem}", file=sys.stderr)
        return 2
    if args.model is not None and not (args.model / "config.json").is_file():
        print(f"compare.py: {args.model} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
        return 2
    import torch

    header = {
        "date": time.strftime("%Y-%m-%d"),
        "gguf": str(args.gguf),
        "model": str(args.model),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "background_load": args.background_load,
        "load_average": " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if Path("/proc/loadavg").exists()
        else None,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "llama_cpp_python": _version("llama_cpp"),
    }
    if not args.json:
        for key, value in header.items():
            print(f"{key}: {value}")
        print(flush=True)
    rounds: list[list[Result]] = []
    with background_load(args.background_load):
        for number in range(1, args.rounds + 1):
            rounds.append([])
            for engine in args.engines:
                print(f"round {number}/{args.rounds}: running {engine} ...", file=sys.stderr, flush=True)
                rounds[-1].append(_run_engine(engine, args))
    rows = _rows(rounds)
    if args.context_list and any(row.get("contexts") for row in rows):
        chart = args.chart or REPO_ROOT / "benchmarks" / "decode_vs_context.svg"
        title = f"Decode tok/s as the context grows — {Path(args.gguf).name}"
        subtitle = f"{header['date']}, {header['cpu']} ({header['cpu_capability']}), {args.threads} threads"
        chart.write_text(_svg_chart([r for r in rows if r.get("contexts")], title, subtitle), encoding="utf-8")
        print(f"chart: {chart}", file=sys.stderr)
    if args.json:
        print(json.dumps({**header, "results": rows}, indent=2))
    else:
        print(_markdown(rows))
        mismatched = [row["engine"] for row in rows if row["threads"] not in (None, args.threads)]
        if mismatched:
            print(f"\nwarning: {mismatched} did not run with {args.threads} threads")
    return 0


def _version(module: str) -> str | None:
    from importlib import metadata

    names = {"llama_cpp": "llama-cpp-python"}
    try:
        return metadata.version(names.get(module, module))
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
