"""Write a 1B-class random-weight GGUF for speed measurements at a realistic size.

Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads over 8 KV heads, MLP 8192, tied embedding,
llama3 RoPE base 500000) over the demo's vocabulary (49152 tokens, its tokenizer and chat
template copied from the demo GGUF), matrices in Q4_0, the token embedding in Q8_0 (what
llama-quantize gives a tied embedding), norms in F32. About 720 MB. The text it writes is garbage;
the timings are honest: every engine reads the same bytes per token as for a real 1B model.

    python benchmarks/make_1b_gguf.py                      # ~/.cache/llmchat/bench/random-1b-q4_0.gguf
    python benchmarks/compare.py --gguf ~/.cache/llmchat/bench/random-1b-q4_0.gguf --engines llmchat,llama-cpp-python
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmchat.models import demo_path  # noqa: E402

SHAPE = {
    "block_count": 16,
    "embedding_length": 2048,
    "feed_forward_length": 8192,
    "head_count": 32,
    "head_count_kv": 8,
    "context_length": 8192,
}
DEFAULT_OUT = Path.home() / ".cache" / "llmchat" / "bench" / "random-1b-q4_0.gguf"


def _copy_vocabulary(writer: gguf.GGUFWriter, source: gguf.GGUFReader) -> int:
    """The demo's tokenizer.* keys, unchanged; returns the vocabulary size."""
    size = 0
    for key, field in source.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=field.types[-1])
            if key == "tokenizer.ggml.tokens":
                size = len(value)
        else:
            writer.add_key_value(key, value, field.types[0])
    return size


def write(out: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    source = gguf.GGUFReader(demo_path())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_name("random 1B (Llama-3.2-1B shape, demo vocabulary)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    vocabulary = _copy_vocabulary(writer, source)
    hidden, ffn = SHAPE["embedding_length"], SHAPE["feed_forward_length"]
    heads, kv_heads = SHAPE["head_count"], SHAPE["head_count_kv"]
    head_dim = hidden // heads
    writer.add_block_count(SHAPE["block_count"])
    writer.add_context_length(SHAPE["context_length"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocabulary)

    def matrix(name: str, rows: int, columns: int, qtype: GGMLQuantizationType, std: float = 0.02) -> None:
        weights = (rng.standard_normal((rows, columns), dtype=np.float32) * std).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(hidden, dtype=np.float32))

    matrix("token_embd.weight", vocabulary, hidden, GGMLQuantizationType.Q8_0)
    norm("output_norm.weight")
    q4 = GGMLQuantizationType.Q4_0
    for layer in range(SHAPE["block_count"]):
        began = time.perf_counter()
        prefix = f"blk.{layer}"
        norm(f"{prefix}.attn_norm.weight")
        norm(f"{prefix}.ffn_norm.weight")
        matrix(f"{prefix}.attn_q.weight", hidden, hidden, q4)
        matrix(f"{prefix}.attn_k.weight", kv_heads * head_dim, hidden, q4)
        matrix(f"{prefix}.attn_v.weight", kv_heads * head_dim, hidden, q4)
        matrix(f"{prefix}.attn_output.weight", hidden, hidden, q4)
        matrix(f"{prefix}.ffn_gate.weight", ffn, hidden, q4)
        matrix(f"{prefix}.ffn_up.weight", ffn, hidden, q4)
        matrix(f"{prefix}.ffn_down.weight", hidden, ffn, q4, std=0.01)
        print(
            f"layer {layer + 1}/{SHAPE['block_count']} quantized in {time.perf_counter() - began:.1f} s",
            file=sys.stderr,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="write it again even if it exists")
    args = parser.parse_args()
    if args.out.exists() and not args.force:
        print(args.out)
        return 0
    print(write(args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
