"""gpt-oss (GptOssForCausalLM) against transformers on tiny random weights (tests/tiny_gpt_oss.py).

Attention with learned sinks, q/k/v/o biases, alternating sliding (window 8, shorter than the
sequences) and full layers, yarn RoPE without truncation; a mixture of 8 experts (2 per token)
with router and expert biases, top-k before the softmax and the clamped SwiGLU, whose transformers
parameters are [experts, in, out] with gate and up interleaved. From HF folders (both config.json
styles, and the published MXFP4 experts) and from GGUF files as llama.cpp's converter writes them
(F32, Q8_0, MXFP4 experts), then the harmony chat format: the template renders as transformers
renders it, the analysis channel is the reasoning, a call to a function is a tool call.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

import llmchat
from llmchat.engine.chat_template import ChatTemplates
from llmchat.engine.config import from_hf_config
from llmchat.engine.gguf import GGUFFile
from llmchat.engine.model import Attention
from llmchat.engine.moe import MoE, PackedExperts
from llmchat.engine.reasoning import HARMONY_MARKERS, HarmonySplitter
from llmchat.engine.tokenizer import StreamDecoder
from llmchat.engine.tool_calls import split_tool_calls
from tests.gguf_export import export_gguf
from tests.hf_reference import hf_greedy, hf_logits, hf_model, llmchat_greedy, random_ids, vocab_size
from tests.tiny_gpt_oss import build_gpt_oss

TOL = 1e-4
LOGITS_LEN = 40  # five windows of 8
PROMPT_LEN = 12
NEW_TOKENS = 20
F32, Q8_0, MXFP4 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.MXFP4

hf_logging.disable_progress_bar()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`folder(style)`: the tiny gpt-oss folder with a new- or old-style config.json, built once each."""
    root = tmp_path_factory.mktemp("gpt_oss")
    made: dict[str, Path] = {}

    def get(style: str = "new") -> Path:
        if style not in made:
            made[style] = build_gpt_oss(root / style, config_style=style)
        return made[style]

    return get


@pytest.fixture(scope="module")
def gguf_file(folder: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("gpt_oss_gguf")
    made: dict[gguf.GGMLQuantizationType, Path] = {}

    def get(qtype: gguf.GGMLQuantizationType = F32) -> Path:
        if qtype not in made:
            made[qtype] = export_gguf(folder("new"), root / f"gpt-oss-{qtype.name}.gguf", qtype=qtype)
        return made[qtype]

    return get


@pytest.fixture(scope="module")
def reference(folder: Callable[[str], Path]) -> tuple[list[int], torch.Tensor]:
    """(ids, transformers' float32 logits) of a 40-token input."""
    ids = random_ids(LOGITS_LEN, vocab_size(folder("new")), seed=1)
    return ids, hf_logits(hf_model(folder("new")), ids)


_greedy = llmchat_greedy


def _moe_blocks(model: Any) -> list[MoE]:
    return [block.mlp for block in model.model.layers if isinstance(block.mlp, MoE)]


# -- Hugging Face folders ------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["new", "old"])
def test_logits_match_transformers(style: str, folder: Callable[[str], Path], reference: tuple) -> None:
    ids, expected = reference
    path = folder(style)
    if style == "old":  # the published spelling: rope_scaling + rope_theta, no layer_types
        raw = json.loads((path / "config.json").read_text())
        assert "rope_parameters" not in raw and "layer_types" not in raw and raw["rope_scaling"]["truncate"] is False
        expected = hf_logits(hf_model(path), ids)  # transformers reading the old spelling
    ours = llmchat.load(path, device="cpu", dtype="float32").logits(ids)
    error = (ours - expected).abs().max().item()
    assert error < TOL, f"{style}: max |Δlogit| {error:.2e}"


def test_greedy_tokens_match_generate(folder: Callable[[str], Path]) -> None:
    """Prefill of 12 tokens, then 20 KV-cached decoding steps, across the window of 8."""
    path = folder("new")
    prompt = random_ids(PROMPT_LEN, vocab_size(path), seed=2)
    expected = hf_greedy(hf_model(path), prompt, NEW_TOKENS)
    assert _greedy(llmchat.load(path, device="cpu", dtype="float32"), prompt, NEW_TOKENS) == expected
    assert len(set(expected)) > 3, "degenerate reference"
    # a prefill in chunks of 5 (queries after cached keys, the sliding layers' ring) decodes alike
    chunked = llmchat.load(path, device="cpu", dtype="float32", prefill_chunk=5)
    assert _greedy(chunked, prompt, NEW_TOKENS) == expected


def test_bfloat16_follows_float32(folder: Callable[[str], Path], reference: tuple) -> None:
    """In bfloat16 (sinks, biases and routing in the model's dtype, softmaxes in float32) the logits
    stay close to transformers' float32 ones."""
    ids, expected = reference
    ours = llmchat.load(folder("new"), device="cpu", dtype="bfloat16").logits(ids)
    off = (ours - expected).abs().amax(-1) / expected.abs().max()
    assert off.median().item() < 0.05, off
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.8


def test_config(folder: Callable[[str], Path]) -> None:
    config = llmchat.load(folder("new"), device="cpu", dtype="float32").config
    assert config.architecture == "gpt_oss" and config.attn_sinks and config.qkv_bias and config.o_bias
    assert config.sliding_layers == (True, False, True, False) and config.sliding_window == 8 < LOGITS_LEN
    assert config.rope.type == "yarn" and config.rope.truncate is False and config.rope.factor == 4.0
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 32)
    assert config.moe_bias and config.moe_softmax_topk and (config.swiglu_limit, config.swiglu_alpha) == (7.0, 1.702)
    # GptOssConfig's defaults: head_dim 64, biases, window 128, yarn (factor 32 over 4096, no truncation)
    bare = from_hf_config(
        {
            "architectures": ["GptOssForCausalLM"],
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": 10,
        }
    )
    assert (bare.head_dim, bare.sliding_window, bare.num_experts, bare.num_experts_per_tok) == (64, 128, 128, 4)
    assert bare.rope.type == "yarn" and bare.rope.factor == 32.0 and bare.rope.truncate is False
    assert bare.rope.original_max_position_embeddings == 4096 and bare.rope.theta == 150000.0
    # an old-style rope_scaling without `truncate` truncates, as transformers' yarn does by default
    old = from_hf_config(
        {
            "architectures": ["GptOssForCausalLM"],
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": 10,
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
        }
    )
    assert old.rope.truncate is True and old.rope.factor == 8.0


def test_routers_choose_different_experts(folder: Callable[[str], Path], reference: tuple) -> None:
    """Each sparse layer sends the 40 tokens to most of its 8 experts, in many different pairs."""
    ids, _ = reference
    model = llmchat.load(folder("new"), device="cpu", dtype="float32")
    chosen: list[torch.Tensor] = []
    originals = [block.route for block in _moe_blocks(model)]
    for block, route in zip(_moe_blocks(model), originals):
        block.route = lambda x, route=route: (out := route(x), chosen.append(out[1]))[0]  # type: ignore[method-assign]
    model.logits(ids)
    assert len(chosen) == 4
    for layer, experts in enumerate(chosen):
        pairs = {tuple(sorted(row)) for row in experts.tolist()}
        assert len(set(experts.flatten().tolist())) >= 6 and len(pairs) >= 6, f"layer {layer}: {pairs}"


def test_sinks_matter(folder: Callable[[str], Path], reference: tuple) -> None:
    """Without its sinks (plain attention) the model is far from transformers: the sinks are used."""
    ids, expected = reference
    model = llmchat.load(folder("new"), device="cpu", dtype="float32")
    attentions = [m for m in model.model.modules() if isinstance(m, Attention)]
    assert len(attentions) == 4 and all(a.sinks is not None and a.sinks.abs().min() > 0 for a in attentions)
    for attention in attentions:
        attention.sinks = None
    error = (model.logits(ids) - expected).abs().max().item()
    assert error > 100 * TOL, f"ignoring the sinks changes the logits by only {error:.2e}"


def _mxfp4_folder(source: Path, out: Path) -> Path:
    """`source` as OpenAI publishes gpt-oss: experts as MXFP4 `*_blocks` [experts, out, groups, 16] and
    `*_scales` [experts, out, groups] (random codes, exponents 2**-5 ... 2**0), quant_method mxfp4."""
    shutil.copytree(source, out)
    path = next(out.glob("*.safetensors"))
    state = load_file(path)
    generator = torch.Generator().manual_seed(4)
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = state.pop(name).shape
        groups = (experts, outputs, inputs // 32)
        state[f"{name}_blocks"] = torch.randint(0, 256, (*groups, 16), generator=generator, dtype=torch.uint8)
        state[f"{name}_scales"] = torch.randint(122, 128, groups, generator=generator, dtype=torch.uint8)
    save_file(state, path, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens"],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_mxfp4_folder_matches_transformers(folder: Callable[[str], Path], tmp_path: Path) -> None:
    """The published checkpoints' MXFP4 experts (quant_method mxfp4) are dequantized at load, as
    transformers dequantizes them without its GPU kernels."""
    path = _mxfp4_folder(folder("new"), tmp_path / "mxfp4")
    ids = random_ids(LOGITS_LEN, vocab_size(path), seed=1)
    expected = hf_logits(hf_model(path), ids)
    model = llmchat.load(path, device="cpu", dtype="float32")
    assert model.package.quantization == "mxfp4 experts"
    error = (model.logits(ids) - expected).abs().max().item()
    assert error < TOL, f"MXFP4 folder: max |Δlogit| {error:.2e}"


# -- GGUF ----------------------------------------------------------------------------------------


def test_gguf_f32_matches_transformers(
    gguf_file: Callable[..., Path], folder: Callable[[str], Path], reference: tuple
) -> None:
    path = gguf_file(F32)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.bias", "blk.0.ffn_up_exps.bias"} <= names
    assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.bias", "blk.0.post_attention_norm.weight"} <= names
    file = GGUFFile(path)
    assert file.architecture == "gpt-oss"
    ours, theirs = file.model_config(), llmchat.load(folder("new"), device="cpu", dtype="float32").config
    for field in ("sliding_layers", "sliding_window", "rope", "head_dim", "num_experts", "moe_intermediate_size"):
        assert getattr(ours, field) == getattr(theirs, field), field
    ids, expected = reference
    model = llmchat.load(path, device="cpu", dtype="float32")
    error = (model.logits(ids) - expected).abs().max().item()
    assert error < TOL, f"GGUF F32: max |Δlogit| {error:.2e}"
    prompt = random_ids(PROMPT_LEN, vocab_size(folder("new")), seed=2)
    assert _greedy(model, prompt, NEW_TOKENS) == hf_greedy(hf_model(folder("new")), prompt, NEW_TOKENS)


def test_q8_0_gguf_is_close_to_the_float_model(gguf_file: Callable[..., Path], reference: tuple) -> None:
    """Q8_0 everywhere (experts kept packed, int8): close to the float model, same argmax nearly everywhere."""
    ids, expected = reference
    model = llmchat.load(gguf_file(Q8_0), device="cpu", dtype="float32")
    assert all(isinstance(block.gate_up_exps, PackedExperts) for block in _moe_blocks(model))
    ours = model.logits(ids)
    off = (ours - expected).abs().amax(-1) / expected.abs().max()
    assert off.median().item() < 0.05, off
    # near-ties of random weights flip under rounding (the router's too: another expert then runs)
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.8


def test_mxfp4_experts_are_dequantized_exactly(
    gguf_file: Callable[..., Path], folder: Callable[[str], Path], reference: tuple
) -> None:
    """An MXFP4 file (llama.cpp's MOSTLY_MXFP4_MOE: experts MXFP4, the rest float): the experts load as
    float stacks holding exactly gguf-py's dequantized values, so the model is transformers' with those
    expert weights."""
    path = gguf_file(MXFP4)
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert {k for n, k in kinds.items() if n.endswith("_exps.weight")} == {MXFP4}
    assert {k for n, k in kinds.items() if not n.endswith("_exps.weight")} == {F32}
    model = llmchat.load(path, device="cpu", dtype="float32")
    assert not model.info.plan and all(isinstance(b.gate_up_exps, torch.nn.Parameter) for b in _moe_blocks(model))
    hf = hf_model(folder("new"))
    tensors = {t.name: t for t in reader.tensors}
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            values = {}
            for part in ("gate", "up", "down"):
                t = tensors[f"blk.{i}.ffn_{part}_exps.weight"]
                shape = tuple(int(d) for d in reversed(t.shape))  # [experts, out, in]
                values[part] = torch.from_numpy(gguf.quants.dequantize(t.data, MXFP4).reshape(shape).copy())
            gate_up = torch.stack((values["gate"], values["up"]), dim=2).flatten(1, 2)  # interleave the rows
            layer.mlp.experts.gate_up_proj.copy_(gate_up.transpose(1, 2))
            layer.mlp.experts.down_proj.copy_(values["down"].transpose(1, 2))
    ids, float_logits = reference
    expected = hf_logits(hf, ids)
    assert (expected - float_logits).abs().max().item() > 1e-2  # MXFP4 did round the experts
    error = (model.logits(ids) - expected).abs().max().item()
    assert error < TOL, f"MXFP4 GGUF: max |Δlogit| {error:.2e}"


def test_mxfp4_dequantization_matches_gguf_py() -> None:
    """llmchat's torch MXFP4 decoding gives gguf-py's values bit for bit, every exponent and nibble included."""
    from llmchat.engine.gguf_tensors import dequantize_bytes

    raw = np.random.default_rng(3).integers(0, 256, (8, 17 * 4), dtype=np.uint8)
    raw[:, ::17] = (np.arange(8 * 4).reshape(8, 4) * 8 % 256).astype(np.uint8)  # exponents 0 ... 248
    expected = gguf.quants.dequantize(raw, MXFP4)
    ours = dequantize_bytes(raw.reshape(-1).copy(), MXFP4, (8, 128)).numpy()
    assert np.array_equal(ours, expected)


# -- harmony -------------------------------------------------------------------------------------

_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
_CONVERSATIONS: dict[str, tuple[list[dict], dict[str, Any]]] = {
    "one question": ([{"role": "user", "content": "Hello there"}], {}),
    "instructions and turns": (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "thinking": "dropped from the prompt"},
            {"role": "user", "content": "How are you?"},
        ],
        {"reasoning_effort": "high"},
    ),
    "tool call and result": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "thinking": "I should call the tool.", "tool_calls": [_CALL]},
            {"role": "tool", "content": "sunny, 21 C"},
        ],
        {"tools": _TOOLS},
    ),
    "training turn": (
        [
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4", "thinking": "Two and two."},
        ],
        {"add_generation_prompt": False},
    ),
}


@pytest.mark.parametrize("name", list(_CONVERSATIONS))
def test_harmony_template_renders_like_transformers(name: str, folder: Callable[[str], Path]) -> None:
    messages, options = _CONVERSATIONS[name]
    path = folder("new")
    add_generation_prompt = options.get("add_generation_prompt", True)
    variables = {k: v for k, v in options.items() if k not in ("tools", "add_generation_prompt")}
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tools=options.get("tools"), add_generation_prompt=add_generation_prompt, tokenize=False, **variables
    )
    templates = ChatTemplates.from_folder(path)
    assert templates is not None
    ours = templates.get().render(
        messages, tools=options.get("tools"), add_generation_prompt=add_generation_prompt, **variables
    )
    assert ours == expected
    assert ours.startswith("<|start|>system<|message|>")
    assert ours.endswith("<|start|>assistant" if add_generation_prompt else "<|return|>")


def _split(tokenizer: Any, text: str) -> tuple[str, str]:
    """(reasoning, content) of `text` streamed token by token through a HarmonySplitter."""
    splitter, decoder = HarmonySplitter(), StreamDecoder(tokenizer)
    reasoning = content = ""
    for token in tokenizer.encode(text):
        piece = splitter.feed(decoder.push(token))
        reasoning, content = reasoning + piece.reasoning, content + piece.content
    for piece in (splitter.feed(decoder.flush()), splitter.flush()):
        reasoning, content = reasoning + piece.reasoning, content + piece.content
    return reasoning, content


def test_harmony_answer_splits_into_reasoning_and_content(folder: Callable[[str], Path]) -> None:
    model = llmchat.load(folder("new"), device="cpu", dtype="float32")
    assert model.traits.reasoning and model.traits.reasoning_markers == HARMONY_MARKERS
    tokenizer = model.tokenizer
    answer = (
        "<|channel|>analysis<|message|>The user greets me. Reply kindly.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello, how are you?<|return|>"
    )
    assert _split(tokenizer, answer) == ("The user greets me. Reply kindly.", "Hello, how are you?")
    # a call to a function: its JSON arguments become a tool call in the content
    call = (
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary"
        ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    reasoning, content = _split(tokenizer, call)
    assert reasoning == "Need the weather."
    assert split_tool_calls(content) == ("", [_CALL])
    # through the generator: a forced harmony answer comes out split (the prompt ends in "<|start|>assistant")
    templates = ChatTemplates.from_folder(folder("new"))
    assert templates is not None
    prompt = tokenizer.encode(templates.get().render([{"role": "user", "content": "Hi"}]))
    prefix = tokenizer.encode(answer.removesuffix("<|return|>"))
    events = list(model.generate(prompt, answer_prefix=prefix, max_new_tokens=len(prefix)))
    assert (events[-1].reasoning, events[-1].content) == ("The user greets me. Reply kindly.", "Hello, how are you?")
    # text that is not harmony at all stays the answer
    assert _split(tokenizer, "just words") == ("", "just words")


def test_gguf_keeps_harmony(gguf_file: Callable[..., Path], folder: Callable[[str], Path]) -> None:
    """The GGUF's vocabulary ends turns at <|return|> and <|call|> (not <|end|>) and its template is the
    folder's: the same reasoning split, the same prompts."""
    path = gguf_file(F32)
    model = llmchat.load(path, device="cpu", dtype="float32")
    package = model.package
    tokenizer = model.tokenizer
    ends = {tokenizer.token_text(i) for i in package.eos_token_ids}
    assert {"<|return|>", "<|call|>"} <= ends and "<|end|>" not in ends
    assert model.traits.reasoning_markers == HARMONY_MARKERS
    messages = _CONVERSATIONS["instructions and turns"][0]
    folder_templates = ChatTemplates.from_folder(folder("new"))
    assert package.templates is not None and folder_templates is not None
    assert package.templates.get().render(messages) == folder_templates.get().render(messages)


@pytest.mark.parametrize("source", ["folder", "Q8_0"])
def test_the_memory_bill_counts_sinks_and_biases(
    source: str, folder: Callable[[str], Path], gguf_file: Callable[..., Path]
) -> None:
    """The predicted weight bytes (sinks, router and expert biases included) are what the modules hold."""
    from llmchat.engine.memory import active_parameter_count, module_bytes, parameter_count, weight_bytes

    model = llmchat.load(folder("new") if source == "folder" else gguf_file(Q8_0), device="cpu", dtype="float32")
    config = model.package.config
    predicted = weight_bytes(config, torch.float32, model.info.plan, mapped_embedding=model.info.mapped_embedding > 0)
    assert predicted == module_bytes(model.model)
    if source == "folder":
        assert parameter_count(config) == sum(p.numel() for p in model.model.parameters())
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size + 2 * 32 + config.hidden_size
        assert parameter_count(config) - active_parameter_count(config) == 4 * (8 - 2) * per_expert


def test_packed_gguf_comes_back_from_the_packed_cache(gguf_file: Callable[..., Path], tmp_path: Path) -> None:
    """The second load of the Q8_0 file restores packed experts, sinks and biases from the cache."""
    first = llmchat.load(gguf_file(Q8_0), device="cpu", dtype="float32", cache_dir=tmp_path)
    second = llmchat.load(gguf_file(Q8_0), device="cpu", dtype="float32", cache_dir=tmp_path)
    assert second.info.from_cache and not first.info.from_cache
    ids = random_ids(12, second.config.vocab_size, seed=5)
    assert torch.equal(second.logits(ids), first.logits(ids))
