"""Speed regression guard: fail when decode falls below a fraction of the last recorded numbers.

Not a timed unit test (machines differ and drift ±20% over minutes): a script run on demand, e.g.
before merging a change to the engine. It runs `llmchat bench` on the demo model (or --model) a
few times, takes the best, and compares with the record for *this* machine — CPU model, its
instruction set level and the thread count — in benchmarks/baseline.json. No record for this
machine yet: it says so and exits 0; `--record` stores the new numbers.

    python benchmarks/guard.py                  # compare (exit 1 below 80% of the record)
    python benchmarks/guard.py --record         # store this machine's numbers
    python benchmarks/guard.py --fraction 0.9 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compare import cpu_model  # benchmarks/ is this script's folder, first on sys.path

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = REPO_ROOT / "benchmarks" / "baseline.json"


def _machine(bench: dict[str, Any]) -> str:
    return f"{cpu_model()} | {bench['cpu_capability']} | {bench['threads']} threads | {bench['device']}"


def _bench(model: Path, repeat: int, prompt_tokens: int, gen_tokens: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "llmchat", "bench", str(model), "--json", "--repeat", str(repeat)]
    command += ["--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens)]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"guard.py: llmchat bench failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=None, help="model (default: the demo GGUF)")
    parser.add_argument("--fraction", type=float, default=0.8, help="fail below this share of the record")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--record", action="store_true", help="store this run as the machine's record")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.demo_model import demo_gguf_file

        args.model = demo_gguf_file()
    bench = _bench(args.model, args.repeat, args.prompt_tokens, args.gen_tokens)
    machine = _machine(bench)
    key = f"{Path(args.model).name} | {machine}"
    records = json.loads(BASELINE.read_text(encoding="utf-8")) if BASELINE.exists() else {}
    now = {k: bench[k] for k in ("decode_tok_s", "prefill_tok_s", "ttft_s", "weights")}
    print(f"{key}\nnow:      decode {now['decode_tok_s']:.1f} tok/s, prefill {now['prefill_tok_s']:.1f} tok/s")
    if args.record:
        records[key] = now | {"date": time.strftime("%Y-%m-%d")}
        BASELINE.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"recorded in {BASELINE.relative_to(REPO_ROOT)}")
        return 0
    record = records.get(key)
    if record is None:
        print("no record for this machine yet; run with --record to store one")
        return 0
    decode, prefill = record["decode_tok_s"], record["prefill_tok_s"]
    print(f"recorded: decode {decode:.1f} tok/s, prefill {prefill:.1f} tok/s ({record['date']})")
    ratio = now["decode_tok_s"] / record["decode_tok_s"]
    if ratio < args.fraction:
        print(f"FAIL: decode at {ratio:.0%} of the record (threshold {args.fraction:.0%})")
        return 1
    print(f"ok: decode at {ratio:.0%} of the record (threshold {args.fraction:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
