"""A tiny random-weight gpt-oss folder (GptOssForCausalLM) with a harmony tokenizer and chat template.

Like tests/tiny_models.py (whose corpus, BPE and weight re-draw it reuses), but the vocabulary has
harmony's special tokens and `tokenizer_config.json` a harmony-style template, so that the reasoning
split (analysis channel) and the tool-call header (`to=functions.NAME`) can be tested. Weights: 8
experts, 2 per token, 4 layers alternating sliding (window 8) and full attention, yarn RoPE without
truncation, nonzero sinks, router and expert biases.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from tests.tiny_models import _BASE, _randomize, _tokenizer_json

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
STARTOFTEXT, ENDOFTEXT = "<|startoftext|>", "<|endoftext|>"
HARMONY_TOKENS = (START, END, MESSAGE, CHANNEL, RETURN, CALL, CONSTRAIN, STARTOFTEXT, ENDOFTEXT)

# Harmony as gpt-oss's template writes it (system, developer with instructions and tools, user,
# assistant final / analysis / tool call, tool result), written for these tests.
HARMONY_TEMPLATE = """\
{%- set ns = namespace(tool=none, instructions='', rest=messages) -%}
<|start|>system<|message|>You are a tiny test model.
Reasoning: {{ reasoning_effort if reasoning_effort is defined else 'medium' }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.
{%- if tools %}
Calls to these tools must go to the commentary channel: 'functions'.
{%- endif %}<|end|>
{%- if messages[0].role in ('system', 'developer') -%}
{%- set ns.instructions = messages[0].content -%}{%- set ns.rest = messages[1:] -%}
{%- endif -%}
{%- if ns.instructions or tools -%}
<|start|>developer<|message|>
{%- if ns.instructions %}# Instructions

{{ ns.instructions }}

{% endif -%}
{%- if tools %}# Tools

## functions

namespace functions {

{% for tool in tools %}// {{ tool.function.description }}
type {{ tool.function.name }} = (_: {{ tool.function.parameters | tojson }}) => any;

{% endfor %}} // namespace functions
{%- endif %}<|end|>
{%- endif -%}
{%- for message in ns.rest -%}
{%- if message.role == 'user' -%}
<|start|>user<|message|>{{ message.content }}<|end|>
{%- elif message.role == 'assistant' and message.tool_calls -%}
{%- if message.thinking -%}<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>{%- endif -%}
{%- for call in message.tool_calls[:1] -%}
<|start|>assistant to=functions.{{ call.function.name }}<|channel|>commentary <|constrain|>json<|message|>
{{- call.function.arguments | tojson }}<|call|>
{%- set ns.tool = call.function.name -%}
{%- endfor -%}
{%- elif message.role == 'assistant' -%}
{%- if loop.last and not add_generation_prompt -%}
{%- if message.thinking -%}<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>{%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|return|>
{%- else -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
{%- endif -%}
{%- elif message.role == 'tool' -%}
{%- if ns.tool is none -%}{{ raise_exception('a tool result without a tool call before it') }}{%- endif -%}
<|start|>functions.{{ ns.tool }} to=assistant<|channel|>commentary<|message|>{{ message.content | tojson }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}
"""

# 4 layers: sliding, full, sliding, full (GptOssConfig's default layer_types); 8 experts of width 32.
CONFIG: dict[str, Any] = {
    **_BASE,
    "num_hidden_layers": 4,
    "head_dim": 16,
    "intermediate_size": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "sliding_window": 8,
    "max_position_embeddings": 256,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 64,
    },
}


def harmony_tokenizer_json() -> str:
    """tiny_models' byte-level BPE with harmony's special tokens added after its own."""
    tokenizer = Tokenizer.from_str(_tokenizer_json(False))
    tokenizer.add_special_tokens(list(HARMONY_TOKENS))
    return tokenizer.to_str()


def _to_old_style(config: dict[str, Any]) -> dict[str, Any]:
    """The published gpt-oss config.json spelling: rope_scaling + rope_theta, torch_dtype, no
    layer_types (the alternation is derived)."""
    old = dict(config)
    rope = dict(old.pop("rope_parameters"))
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = rope
    old["torch_dtype"] = old.pop("dtype")
    old.pop("layer_types")
    return old


def build_gpt_oss(folder: Path, *, config_style: str = "new", seed: int = 0, **overrides: Any) -> Path:
    """Write the tiny gpt-oss folder into `folder` and return it."""
    text = harmony_tokenizer_json()
    tokenizer = Tokenizer.from_str(text)
    ids = {token: tokenizer.token_to_id(token) for token in HARMONY_TOKENS}
    eos_ids = [ids[RETURN], ids[ENDOFTEXT], ids[CALL]]  # gpt-oss's generation_config
    config = AutoConfig.for_model(
        "gpt_oss",
        **{**CONFIG, **overrides},
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        bos_token_id=ids[STARTOFTEXT],
        eos_token_id=eos_ids,
        pad_token_id=ids[ENDOFTEXT],
        dtype="float32",
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed + zlib.crc32(b"gpt-oss"))
    with torch.no_grad():  # sinks around 1 (a real share of the softmax), router biases that matter
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(1.0, 1.0, generator=torch.Generator().manual_seed(seed + 7))
            layer.mlp.router.bias.mul_(2.0)
    model.generation_config = GenerationConfig(bos_token_id=ids[STARTOFTEXT], eos_token_id=eos_ids)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if config_style == "old":
        path = folder / "config.json"
        path.write_text(json.dumps(_to_old_style(json.loads(path.read_text())), indent=2))
    (folder / "tokenizer.json").write_text(text)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": STARTOFTEXT,
        "eos_token": RETURN,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": HARMONY_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder
