"""Decode speed of a mixture-of-experts model against a dense one with the same active parameters.

A decode step of an MoE model should cost what its *active* parameters cost: it runs the k experts
the router chose and reads only their bytes. This script writes two random-weight Hugging Face
folders with transformers' own classes (garbage text, honest timings) and times greedy decoding of
each with llmchat, every run in its own process, interleaved A B A B, and reports the median of the
per-round ratios:

- `moe`: Qwen3-MoE, hidden 1024, 16 layers, 64 experts of width 256, 8 per token (~0.9B parameters,
  ~0.2B active),
- `dense`: Qwen3 of the same shape with one MLP of width 8 × 256 = 2048 (the same active count).

    python benchmarks/moe_decode.py                  # 3 rounds, 64 tokens after a 32-token prompt
    python benchmarks/moe_decode.py --rounds 5 --json
    python benchmarks/moe_decode.py --quant Q4_0     # both as Q4_0 GGUF files: experts packed as int4

With --quant the folders are exported to GGUF as llama.cpp's converter writes them (the test
suite's exporter, tests/gguf_export.py) and loaded packed: a decode step then reads the chosen
experts' packed bytes only.

The folders are kept in --cache (default: the system temp dir) and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAPE: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
MOE = {"num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 256, "norm_topk_prob": True}
DENSE_WIDTH = MOE["num_experts_per_tok"] * MOE["moe_intermediate_size"]


def build(kind: str, folder: Path) -> Path:
    """A random-weight folder of `kind` (moe | dense) with the tiny test tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import build_tiny_model

    if (folder / "config.json").exists():
        return folder
    tokenizer_source = build_tiny_model("qwen3", folder.with_name(folder.name + "-tokenizer"))
    vocab = json.loads((tokenizer_source / "config.json").read_text())["vocab_size"]
    if kind == "moe":
        config = AutoConfig.for_model("qwen3_moe", **SHAPE, **MOE, intermediate_size=DENSE_WIDTH, vocab_size=vocab)
    else:
        config = AutoConfig.for_model("qwen3", **SHAPE, intermediate_size=DENSE_WIDTH, vocab_size=vocab)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_source / name).exists():
            (folder / name).write_bytes((tokenizer_source / name).read_bytes())
    return folder


def to_gguf(folder: Path, quant: str) -> Path:
    """The folder written as a GGUF file of `quant` (Q4_0, Q8_0 ...), next to it."""
    import gguf

    sys.path.insert(0, str(ROOT))
    from tests.gguf_export import export_gguf

    out = folder.with_name(f"{folder.name}-{quant}.gguf")
    if not out.exists():
        export_gguf(folder, out, qtype=gguf.GGMLQuantizationType[quant])
    return out


def worker(folder: Path, tokens: int) -> dict[str, Any]:
    """One timed greedy decode in this process (run as a child)."""
    import llmchat
    from llmchat.engine import SamplingParams

    model = llmchat.load(folder, device="cpu", dtype="float32", context_length=512)
    prompt = list(range(3, 35))  # 32 ordinary token ids
    *_, done = model.generate(prompt, sampling=SamplingParams(temperature=0), max_new_tokens=tokens, stop_on_eos=False)
    from llmchat.engine.memory import active_parameter_count, parameter_count

    return {
        "decode_tok_s": done.decode_tokens_per_second,
        "tokens": done.generated_tokens,
        "parameters": parameter_count(model.config),
        "active_parameters": active_parameter_count(model.config),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llmchat-moe-bench")
    parser.add_argument("--quant", help="export both models to GGUF of this type (e.g. Q4_0) and load them packed")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.tokens)))
        return 0
    folders = {kind: build(kind, args.cache / kind) for kind in ("moe", "dense")}
    if args.quant:
        folders = {kind: to_gguf(folder, args.quant) for kind, folder in folders.items()}
    runs: dict[str, list[float]] = {kind: [] for kind in folders}
    counts: dict[str, dict[str, int]] = {}
    ratios = []
    for _ in range(args.rounds):
        for kind, folder in folders.items():  # A B, A B: each in a fresh process
            out = subprocess.run(
                [sys.executable, __file__, "--worker", str(folder), "--tokens", str(args.tokens)],
                capture_output=True,
                text=True,
                check=True,
            )
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            runs[kind].append(measured["decode_tok_s"])
            counts[kind] = {"parameters": measured["parameters"], "active": measured["active_parameters"]}
        ratios.append(runs["moe"][-1] / runs["dense"][-1])
    result = {
        "shape": {**SHAPE, **MOE, "dense_width": DENSE_WIDTH},
        "weights": args.quant or "float32",
        "decode_tok_s": {kind: statistics.median(values) for kind, values in runs.items()},
        "moe_over_dense": statistics.median(ratios),
        "parameters": counts,
        "rounds": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for kind, value in result["decode_tok_s"].items():
            total, active = counts[kind]["parameters"] / 1e6, counts[kind]["active"] / 1e6
            line = f"{kind:<6} {value:7.1f} tok/s (median of {args.rounds})"
            print(f"{line}  {total:,.0f}M parameters, {active:,.0f}M active")
        print(f"MoE / dense (median of per-round ratios, weights {result['weights']}): {result['moe_over_dense']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
