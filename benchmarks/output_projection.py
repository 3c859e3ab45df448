"""The output projection's product, timed: how the logits are computed against the alternatives.

    python benchmarks/output_projection.py                      # the demo's 49152x576, one row
    python benchmarks/output_projection.py --shape 262144x640   # Gemma 3 270M's
    python benchmarks/output_projection.py --rows 1,37,512 --repeat 50

Rows: llmchat's layer (PackedLinear, OUTPUT_LAYOUT: FBGEMM fp16 GEMM over the int8 codes and a float32
tail, float32 scales after), the int8 kernel the output projection used before (bfloat16 in and out),
and float32 BLAS over the dequantized matrix ([in, out], as model.Linear holds it). Each is timed
in this process on random weights, the median of `--repeat` calls after a warm-up, and its error is
the largest difference from float64 over the weights it multiplies, relative to the largest logit
(the int8 kernel's is its bfloat16 output and input rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from llmchat.engine.memory import module_bytes
from llmchat.engine.packed import OUTPUT_LAYOUT, PackedLinear, int8_rows


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    run()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="49152x576", help="OUTxIN of the matrix (vocab x hidden)")
    parser.add_argument("--rows", default="1", help="comma-separated row counts (1 = a decode step)")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    out, inner = (int(n) for n in args.shape.lower().split("x"))
    weights = torch.randn(out, inner, generator=torch.Generator().manual_seed(0)) * 0.05
    layer = PackedLinear(weights, None, OUTPUT_LAYOUT)
    codes, scales = int8_rows(weights)  # the bfloat16-scaled int8 rows of the int8 kernel
    own = {"llmchat": layer.dequantized().double(), "int8": (codes.float() * scales.float()[:, None]).double()}
    dense = layer.dequantized().t().contiguous()
    print(
        f"{out}x{inner}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; "
        f"llmchat's layer holds {module_bytes(layer) / 2**20:.1f} MiB ({layer.split} columns in fp16)"
    )
    print(f"{'rows':>5} {'product':<48} {'ms':>9} {'error':>9}")
    for rows in (int(n) for n in args.rows.split(",")):
        x = torch.randn(rows, inner, generator=torch.Generator().manual_seed(1))
        low = x.to(torch.bfloat16)
        candidates: list[tuple[str, Callable[[], torch.Tensor], torch.Tensor]] = [
            ("llmchat (FBGEMM fp16 over the codes, float32)", partial(layer, x), own["llmchat"]),
            (
                "int8 kernel, bfloat16 in and out (before)",
                partial(torch.ops.aten._weight_int8pack_mm, low, codes, scales),
                own["int8"],
            ),
            ("float32 BLAS over the dequantized matrix", partial(torch.matmul, x, dense), own["llmchat"]),
        ]
        for name, run, matrix in candidates:
            exact = x.double() @ matrix.t()  # float64 over the weights this product multiplies
            error = ((run().double() - exact).abs().max() / exact.abs().max()).item()
            print(f"{rows:>5} {name:<48} {_median_ms(run, args.repeat):>9.2f} {error:>9.1e}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
