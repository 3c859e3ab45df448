"""A plain decoder layer's decode step in two calls of llmchat's kernel (engine/fused_decode.py; a
mixture of experts' attention half, its experts then running as their module) computes what the layer's
modules compute: the same output and the same keys and values written to the cache, within float32
rounding, at positions inside a prefilled cache; and the modules run instead wherever the layer is not
exactly that layer, or an inspector's hooks observe it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import llmchat
from llmchat.engine import fused_decode, q4kernel

pytestmark = pytest.mark.skipif(q4kernel.available() is None, reason="llmchat's kernel does not build here")


def _model(path: Path, prompt: int = 24) -> llmchat.LoadedModel:
    model = llmchat.load(path, device="cpu", dtype="float32", context_length=64)
    ids = torch.randint(0, model.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(3))
    model.model(ids, model.cache, 0)
    model.cache.append_tokens(ids.tolist())
    return model


@pytest.mark.parametrize(
    ("kind", "qtype"), [("llama", Q.Q4_0), ("llama-bias", Q.Q4_1), ("qwen3", Q.Q4_0), ("qwen3-moe", Q.Q4_0)]
)
def test_each_layer_s_fused_step_is_its_modules_step(kind: str, qtype: Q, tiny_gguf: Callable[..., Path]) -> None:
    model = _model(tiny_gguf(kind, qtype))
    inner, cache = model.model, model.cache
    start = cache.length
    x = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    tables = [inner.rotary.tables(start, start + 1)]
    for index, block in enumerate(inner.layers):
        fused = fused_decode.plan(block, cache)
        assert fused is not None, f"layer {index} of {kind} is a plain layer"
        y_fused = fused(x, *tables[0], start)
        written = cache.keys[index, :, start].clone(), cache.values[index, :, start].clone()
        cache.keys[index, :, start] = cache.values[index, :, start] = float("nan")  # the modules write them again
        block.__dict__["_fused"] = (cache.keys, None)  # this block's modules
        y_modules = block(x, tables, cache, start)
        torch.testing.assert_close(y_fused, y_modules, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(written[0], cache.keys[index, :, start], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(written[1], cache.values[index, :, start], rtol=1e-5, atol=1e-5)
        x = y_modules


def test_a_decode_step_takes_the_fused_path_and_answers_alike(tiny_gguf: Callable[..., Path]) -> None:
    """Through generate: every layer fused, and the greedy answer the modules give (tiny random weights
    leave wide margins between the top logits here, so no rounding flips a token)."""
    path = tiny_gguf("llama", Q.Q4_0)
    prompt = list(range(3, 19))

    def answer(model: llmchat.LoadedModel) -> tuple[int, ...]:
        *_, done = model.generate(prompt, sampling=llmchat.SamplingParams(temperature=0), max_new_tokens=8)
        return done.token_ids

    fused = llmchat.load(path, device="cpu", dtype="float32", context_length=64)
    tokens = answer(fused)
    assert all(block.__dict__["_fused"][1] is not None for block in fused.model.layers)
    modules = llmchat.load(path, device="cpu", dtype="float32", context_length=64)
    for block in modules.model.layers:
        block.__dict__["_fused"] = (modules.cache.keys, None)
    assert answer(modules) == tokens


def test_hooks_and_other_layers_run_the_modules(tiny_gguf: Callable[..., Path]) -> None:
    """An inspector's hook on a layer's attention sees the step (the modules run); Gemma 3's offset
    norms and sandwich norms and OLMoE's q/k norms over the whole projection are not the fused layer."""
    model = _model(tiny_gguf("llama", Q.Q4_0))
    block = model.model.layers[0]
    assert fused_decode.plan(block, model.cache) is not None
    seen: list[int] = []
    handle = block.attn.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    assert fused_decode.plan(block, model.cache) is None
    model.model(torch.tensor([4]), model.cache, model.cache.length)
    handle.remove()
    assert seen == [1]
    for kind in ("gemma3", "olmoe"):  # (OLMoE's are experts too: the q/k norms decide)
        other = _model(tiny_gguf(kind, Q.Q4_0))
        assert all(fused_decode.plan(b, other.cache) is None for b in other.model.layers)
