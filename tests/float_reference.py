"""What an answer of the packed (quantized) path may be asserted to be, on every CPU.

The packed kernels round differently on each instruction set (AVX2, AVX-512, AMX…), so where two
candidates are close the greedy answer itself differs between machines: the demo says "The capital
of France is Paris." on AVX2 and "L'Étoile…" on AVX-512. What holds everywhere is that every token
of the answer is one the float32 reference of the same weights (the GGUF dequantized at load) also
rates at the top: run over the answer's own tokens, the reference gives each chosen token about the
logit the packed path gave it, and nearly its best logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Packed against dequantized on the demo, seen here: up to ~0.25 logits per token with PyTorch's
# kernels (bfloat16 activations, int8 rows requantized from Q8_0), up to ~1.25 with llmchat's int4
# kernel (int8 activations per group of 32, llama.cpp's scheme; perplexity +0.28%, README "Speed");
# a wrong kernel or scale misses by many logits.
LOGIT_TOLERANCE = 1.6


def assert_follows_float_reference(
    gguf: Path,
    messages: Sequence[dict[str, Any]],
    steps: Sequence[tuple[int, float]],
    tolerance: float = LOGIT_TOLERANCE,
) -> None:
    """`steps`: the answer's (token id, logit the packed path gave it), in order, after `messages`
    rendered through the model's chat template."""
    import llmchat

    assert steps, "the answer has no tokens"
    reference = llmchat.load(gguf, device="cpu", dtype="float32", packed=False, context_length=512)
    prompt = reference.tokenizer.encode(reference.template.render(list(messages), add_generation_prompt=True))
    ids = [token for token, _ in steps]
    logits = reference.logits(prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    for index, ((token, logit), row) in enumerate(zip(steps, logits, strict=True)):
        theirs = float(row[token])
        assert abs(logit - theirs) <= tolerance, f"step {index}: logit {logit:.3f}, the reference's {theirs:.3f}"
        best = float(row.max())
        assert best - theirs <= 2 * tolerance, f"step {index}: token {token} is {best - theirs:.3f} below the best"
