"""Tiny random-weight Hugging Face model folders for the reference-parity tests.

Every folder is complete: `config.json` + safetensors weights (written by transformers), a trained
byte-level BPE `tokenizer.json`, `tokenizer_config.json` with a ChatML template, and
`generation_config.json`. Weights are re-drawn after `from_config` so that norms and biases are not
their trivial 1/0 init and greedy decoding has clear winners.
"""

from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

BOS, EOS, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)
KINDS = (
    "llama",
    "llama-headdim",
    "llama3-rope",
    "llama-linear",
    "llama-dynamic",
    "llama-bias",
    "llama-tied",
    "mistral",
    "qwen2",
    "qwen2-sliding",
    "qwen3",
    "qwen2-yarn",
    "gemma2",
    "gemma3",
    "gemma3-linear",
    "phi3",
    "phi3-longrope",
    "smollm3",
    "olmo2",
    "exaone4",
    "cohere2",
    "glm4",
    "granite",
    "lfm2",
    "qwen3_5",
    "granite4",
    "granite4-dense",
)
CONFIG_STYLES = ("new", "old")
# Mixture-of-experts kinds (tests/test_moe.py): 8 experts, 2 per token. Qwen3-MoE without
# renormalization and a dense layer 1 (mlp_only_layers); with renormalization and only every second
# layer sparse (decoder_sparse_step); Mixtral with a window of 8.
# OLMoE (experts as wide as intermediate_size, whole-projection q/k norms, clip_qkv) and Qwen2-MoE
# (q/k/v biases, a sigmoid-gated shared expert, a dense layer 1) route without renormalization.
MOE_KINDS = ("qwen3-moe", "qwen3-moe-step", "mixtral", "olmoe", "qwen2-moe")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A terminal chat talks to a local language model.
Each token is chosen from the logits that the model computes for the next position in the text.
The attention layers look back at the keys and values stored in the cache, so a long prompt only
has to be read once. Rotary position embeddings rotate the queries and the keys by an angle that
grows with the position; scaling the frequencies lets a model read more text than it was trained on.
When the answer is done, the model writes an end token and the chat waits for the next message.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
It was the best of times, it was the worst of times, it was the age of wisdom and of foolishness.
Numbers like 3.14, 42 and 2024 appear in text too, as do names, places, and questions: why? how?
"""

_HIDDEN, _HEADS, _KV_HEADS = 64, 4, 2
_BASE: dict[str, Any] = {
    "hidden_size": _HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": _HEADS,
    "num_key_value_heads": _KV_HEADS,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
}


def _rope(theta: float, rope_type: str = "default", **params: Any) -> dict[str, Any]:
    return {"rope_type": rope_type, "rope_theta": theta, **params}


# Gemma: hidden 48 (sqrt(48) is inexact in bfloat16, so the embedding scale's rounding shows) unlike
# heads * head_dim = 64, head_dim set (the config default is 256), query_pre_attn_scalar unlike
# head_dim so the attention scale is checked; window 8 < the tests' sequences. Gemma 3's three
# layers slide, slide, attend fully (sliding_window_pattern 3), with RoPE bases 1e4 and 1e6.
_GEMMA = {"hidden_size": 48, "num_hidden_layers": 3, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8}
_GEMMA3_ROPE = {"sliding_attention": _rope(10000.0), "full_attention": _rope(1000000.0)}
_PHI3 = {"pad_token_id": None}  # the config default (32000) is outside the tiny vocabulary
# LongRoPE over 24 original positions (factor 128 / 24, so cos/sin are scaled too): a 40-token
# forward uses the long factors, the greedy test (12 + 20 tokens) crosses from short to long
# while decoding, and the prefix-reuse turns prefill at most 22 tokens (short) and cross while
# decoding, identically in the cached and the fresh run.
_LONGROPE = _rope(
    10000.0,
    "longrope",
    short_factor=[1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0],
    long_factor=[1.0, 1.3, 1.8, 2.5, 3.5, 5.0, 7.0, 9.0],
    original_max_position_embeddings=24,
)

# model_type, config overrides (on top of _BASE) for each kind.
_KIND_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"rope_parameters": _rope(10000.0)}),
    "llama-headdim": ("llama", {"head_dim": 32, "rope_parameters": _rope(10000.0)}),
    # head_dim 16, theta 5e5: wavelengths 6.3 (kept), 32 (smoothed), >=167 (divided by factor).
    "llama3-rope": (
        "llama",
        {
            "num_hidden_layers": 3,
            "rope_parameters": _rope(
                500000.0,
                "llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        },
    ),
    "llama-linear": ("llama", {"rope_parameters": _rope(10000.0, "linear", factor=2.0)}),
    # 24 positions * factor 2 = 48: a 40-token input is beyond the trained length but inside the scaled one.
    "llama-dynamic": (
        "llama",
        {"max_position_embeddings": 24, "rope_parameters": _rope(10000.0, "dynamic", factor=2.0)},
    ),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True, "rope_parameters": _rope(10000.0)}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "rope_parameters": _rope(10000.0)}),
    "mistral": ("mistral", {"sliding_window": 8, "rope_parameters": _rope(1000000.0)}),
    # max_window_layers 1 would make layer 1 slide if use_sliding_window (False) were ignored.
    "qwen2": ("qwen2", {"use_sliding_window": False, "max_window_layers": 1, "rope_parameters": _rope(1000000.0)}),
    # Layers with index >= max_window_layers use the window: layer 0 full, layers 1-2 sliding.
    "qwen2-sliding": (
        "qwen2",
        {
            "num_hidden_layers": 3,
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 1,
            "rope_parameters": _rope(1000000.0),
        },
    ),
    "qwen3": ("qwen3", {"head_dim": 32, "max_window_layers": 1, "rope_parameters": _rope(1000000.0)}),
    # YaRN as Qwen2.5 long-context configs use it: factor 4 over 32 trained positions, so the ramp
    # between interpolated and extrapolated frequencies falls inside head_dim and cos/sin are scaled.
    "qwen2-yarn": (
        "qwen2",
        {
            "use_sliding_window": False,
            "rope_parameters": _rope(10000.0, "yarn", factor=4.0, original_max_position_embeddings=32),
        },
    ),
    # Caps that bite on these weights: attention scores reach about 4 (capped below 2), logits about
    # 13 (capped below 8).
    "gemma2": (
        "gemma2",
        {**_GEMMA, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 8.0, "rope_parameters": _rope(10000.0)},
    ),
    "gemma3": ("gemma3_text", {**_GEMMA, "sliding_window_pattern": 3, "rope_parameters": _GEMMA3_ROPE}),
    # Linear scaling on the full-attention layer only, and a final soft-cap (off by default in Gemma 3).
    "gemma3-linear": (
        "gemma3_text",
        {
            **_GEMMA,
            "sliding_window_pattern": 3,
            "final_logit_softcapping": 8.0,
            "rope_parameters": {**_GEMMA3_ROPE, "full_attention": _rope(1000000.0, "linear", factor=4.0)},
        },
    ),
    # Half the head rotates (as in Phi-4-mini); a window of 8 on every layer (Phi-3-mini-4k has one).
    "phi3": (
        "phi3",
        {
            **_PHI3,
            "sliding_window": 8,
            "partial_rotary_factor": 0.5,
            "rope_parameters": _rope(10000.0, partial_rotary_factor=0.5),
        },
    ),
    "qwen3-moe": (
        "qwen3_moe",
        {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],
            "rope_parameters": _rope(1000000.0),
        },
    ),
    "qwen3-moe-step": (
        "qwen3_moe",
        {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "decoder_sparse_step": 2,
            "rope_parameters": _rope(1000000.0),
        },
    ),
    "mixtral": (
        "mixtral",
        {
            "intermediate_size": 64,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
            "rope_parameters": _rope(1000000.0),
        },
    ),
    "olmoe": (
        "olmoe",
        {
            "intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "clip_qkv": 2.0,
            "pad_token_id": None,
            "rope_parameters": _rope(10000.0),
        },
    ),
    "qwen2-moe": (
        "qwen2_moe",
        {
            "num_hidden_layers": 3,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],
            "rope_parameters": _rope(1000000.0),
        },
    ),
    # LFM2: gated short convolutions (kernel 3) in layers 0, 2 and 3, attention in layer 1; the MLP
    # width derived as Lfm2Config does (2/3 of 192 = 128, a multiple of 32); tied embeddings.
    "lfm2": (
        "lfm2",
        {
            "num_hidden_layers": 4,
            "layer_types": ["conv", "full_attention", "conv", "conv"],
            "intermediate_size": 192,
            "block_multiple_of": 32,
            "conv_L_cache": 3,
            "norm_eps": 1e-5,
            "pad_token_id": None,
            "rope_parameters": _rope(1e6),
        },
    ),
    # Qwen3.5 (text): DeltaNet layers 0 and 2 (4 key heads of 16, 8 value heads of 16: grouped), gated
    # attention in layers 1 and 3 with a quarter of head_dim rotating, conv kernel 4 (every 2nd layer
    # attends: a full_attention_interval llama.cpp can say too).
    "qwen3_5": (
        "qwen3_5_text",
        {
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
            "head_dim": 32,
            "linear_num_key_heads": 4,
            "linear_num_value_heads": 8,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "pad_token_id": None,
            "rope_parameters": _rope(1e6, partial_rotary_factor=0.25),
        },
    ),
    # Four layers, a NoPE layer every 4th (SmolLM3's default, and llama.cpp's fixed step): layer 3
    # attends without RoPE. Tied embeddings (the config default); no window (use_sliding_window False).
    "smollm3": (
        "smollm3",
        {"num_hidden_layers": 4, "no_rope_layer_interval": 4, "pad_token_id": None, "rope_parameters": _rope(2e6)},
    ),
    # Not in KINDS (tests/test_smollm3.py): explicit NoPE layers 1 and 3, and with use_sliding_window
    # SmolLM3Config makes exactly those slide (window 8). llama.cpp has no such layout (no GGUF twin).
    "smollm3-sliding": (
        "smollm3",
        {
            "num_hidden_layers": 4,
            "no_rope_layers": [1, 0, 1, 0],
            "use_sliding_window": True,
            "sliding_window": 8,
            "pad_token_id": None,
            "rope_parameters": _rope(2e6),
        },
    ),
    # OLMo 2: no norm in front of attention or MLP, an RMSNorm after each (post_attention_layernorm,
    # post_feedforward_layernorm), and q/k RMSNorms over the whole projection (64 and 32 wide).
    "olmo2": ("olmo2", {"num_hidden_layers": 3, "pad_token_id": None, "rope_parameters": _rope(500000.0)}),
    # EXAONE 4.0 32B's layout at 4 layers: post-norms like OLMo 2, per-head q/k norms, and
    # sliding_window_pattern 3, so layers 0, 1 and 3 slide over 8 tokens with RoPE while layer 2 is
    # global without positions (a sliding layer after a global one; the last layer slides).
    "exaone4": (
        "exaone4",
        {
            "num_hidden_layers": 4,
            "sliding_window": 8,
            "sliding_window_pattern": 3,
            "pad_token_id": None,
            "rope_parameters": _rope(1000000.0),
        },
    ),
    # Command R7B's layout: a parallel block after one LayerNorm, layers 0-2 slide over 8 tokens with
    # interleaved RoPE and layer 3 attends fully without positions (sliding_window_pattern 4); tied
    # embeddings, logits times logit_scale. layer_norm_eps unlike the stray rms_norm_eps of _BASE.
    "cohere2": (
        "cohere2",
        {
            "num_hidden_layers": 4,
            "sliding_window": 8,
            "layer_norm_eps": 1e-4,
            "logit_scale": 0.5,
            "pad_token_id": None,
            "rope_parameters": _rope(50000.0),
        },
    ),
    # GLM-4-0414's layout: half the head rotates, interleaved; four RMSNorms per layer, fused
    # gate_up_proj, q/k/v biases (no o bias); head_dim set (the config default is 128).
    "glm4": (
        "glm4",
        {
            "head_dim": 32,
            "attention_bias": True,
            "pad_token_id": None,
            "partial_rotary_factor": 0.5,
            "rope_parameters": _rope(10000.0, partial_rotary_factor=0.5),
        },
    ),
    # Granite 4 (H-Tiny's layout): Mamba-2 in layers 0, 2 and 3, attention without RoPE in layer 1
    # (position_embedding_type None); 8 Mamba heads of 16 with 2 groups of B/C (state 16), SSD
    # chunks of 16 so that the parity tests' 40-token prompts span three; 8 experts of width 32, 2 per
    # token, beside a shared MLP of 48; Granite's multipliers as below.
    "granite4": (
        "granitemoehybrid",
        {
            "num_hidden_layers": 4,
            "layer_types": ["mamba", "attention", "mamba", "mamba"],
            "intermediate_size": 32,
            "shared_intermediate_size": 48,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "mamba_n_heads": 8,
            "mamba_d_head": 16,
            "mamba_n_groups": 2,
            "mamba_d_state": 16,
            "mamba_d_conv": 4,
            "mamba_chunk_size": 16,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.2,
            "residual_multiplier": 0.3,
            "logits_scaling": 3.0,
            "pad_token_id": None,
            "rope_parameters": _rope(10000.0),
        },
    ),
    # Granite 4 H-Micro's layout: no experts (num_local_experts 0: the shared MLP alone), RoPE in the
    # attention layers 1 and 3, head_dim "auto" (2 * 64 / 4 heads = 32), one group, no conv bias, a
    # kernel of 3. (Untied: tied tiny weights make greedy decoding repeat one token.)
    "granite4-dense": (
        "granitemoehybrid",
        {
            "num_hidden_layers": 4,
            "layer_types": ["mamba", "attention", "mamba", "attention"],
            "intermediate_size": 32,
            "shared_intermediate_size": 96,
            "num_local_experts": 0,
            "position_embedding_type": "rope",
            "mamba_n_heads": 4,
            "mamba_n_groups": 1,
            "mamba_d_state": 8,
            "mamba_d_conv": 3,
            "mamba_chunk_size": 16,
            "mamba_conv_bias": False,
            "embedding_multiplier": 2.0,
            "attention_multiplier": 0.2,
            "residual_multiplier": 0.5,
            "logits_scaling": 2.0,
            "pad_token_id": None,
            "rope_parameters": _rope(10000.0),
        },
    ),
    # Not in KINDS (tests/test_granite4.py): Granite 4 Micro's layout, every layer attending with RoPE and
    # no experts; and a stack of Mamba-2 layers only (no attention layer, no keys and values at all).
    "granite4-micro": (
        "granitemoehybrid",
        {
            "num_hidden_layers": 3,
            "layer_types": ["attention"] * 3,
            "shared_intermediate_size": 96,
            "num_local_experts": 0,
            "position_embedding_type": "rope",
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.2,
            "residual_multiplier": 0.3,
            "logits_scaling": 3.0,
            "pad_token_id": None,
            "rope_parameters": _rope(10000.0),
        },
    ),
    "granite4-mamba": (
        "granitemoehybrid",
        {
            "num_hidden_layers": 3,
            "layer_types": ["mamba"] * 3,
            "intermediate_size": 32,
            "shared_intermediate_size": 48,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "mamba_n_heads": 16,
            "mamba_n_groups": 4,
            "mamba_d_state": 8,
            "mamba_chunk_size": 8,
            "embedding_multiplier": 6.0,
            "residual_multiplier": 0.5,
            "pad_token_id": None,
            "rope_parameters": _rope(10000.0),
        },
    ),
    # Granite 3: llama with four multipliers far from 1 (tests/test_granite.py flips each): embeddings
    # times 12, attention scale 0.2 (not head_dim ** -0.5 = 0.25), branch outputs times 0.3, logits
    # divided by 3 (not a power of two, so dividing and multiplying by 1/3 may round apart).
    "granite": (
        "granite",
        {
            "num_hidden_layers": 3,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.2,
            "residual_multiplier": 0.3,
            "logits_scaling": 3.0,
            "rope_parameters": _rope(10000.0),
        },
    ),
    # Phi3Config keeps the original length at the top level too, and that one wins in transformers.
    "phi3-longrope": ("phi3", {**_PHI3, "original_max_position_embeddings": 24, "rope_parameters": _LONGROPE}),
}


@functools.cache
def _tokenizer_json(add_bos: bool) -> str:
    """A byte-level BPE trained on `_CORPUS`, with the special tokens added after the merges."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 64, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos_id = tokenizer.token_to_id(BOS)
        template = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
        tokenizer.post_processor = processors.Sequence([byte_level, template])
    else:
        tokenizer.post_processor = byte_level
    return tokenizer.to_str()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: norms around 1, nonzero biases, fan-in scaled weights, peaked logits.

    Attention and MLP outputs are doubled (and tied embeddings shrunk) so the residual stream is not
    dominated by the current token's embedding, which makes greedy decoding loop on one token.
    Gemma's and Qwen3.5's norms scale by (1 + w), so their w is drawn around 0 for the same effective
    scale (Qwen3.5's DeltaNet output norm scales by w, as usual).
    """
    gen = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    zero_centred = model.config.model_type.startswith(("gemma", "qwen3_5"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                centre = 0.0 if zero_centred and "linear_attn.norm" not in name else 1.0
                param.copy_(centre + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_((0.3 if tied else 1.0) * noise)
            elif name.startswith("lm_head"):
                param.copy_(0.5 * noise)
            else:
                gain = 2.0 if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else 1.0
                param.copy_(gain * noise * param.shape[-1] ** -0.5)  # fan-in (stacked experts: [E, out, in])


def _old_rope(rope: dict[str, Any], model_type: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) as pre-transformers-5 configs spell one rope parameter dict."""
    rope = dict(rope)
    theta = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    rope.pop("partial_rotary_factor", None)  # old configs keep it at the top level
    if rope_type == "default":
        return theta, None
    if rope_type == "longrope" and model_type == "phi3":
        return theta, {"type": "su", **rope}  # what the first long-context Phi-3 configs called it
    if rope_type in ("llama3", "yarn") or model_type == "gemma3_text":  # Gemma 3 configs say rope_type
        return theta, {"rope_type": rope_type, **rope}
    return theta, {"type": rope_type, **rope}  # the pre-4.45 spelling for linear and dynamic scaling


def _to_old_style(config: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a transformers-5 config.json the way most published checkpoints spell it."""
    old = dict(config)
    rope = old.pop("rope_parameters")
    model_type = old["model_type"]
    if model_type == "gemma3_text":
        # Gemma 3 (transformers 4.5x): global theta + scaling, a local base, a layer pattern.
        old["rope_theta"], old["rope_scaling"] = _old_rope(rope["full_attention"], model_type)
        old["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        old.pop("_sliding_window_pattern", None)
    else:
        old["rope_theta"], old["rope_scaling"] = _old_rope(rope, model_type)
    old["torch_dtype"] = old.pop("dtype")
    if model_type in ("qwen2", "qwen3"):
        # Old Qwen configs carry no layer_types (derived from max_window_layers) and usually keep a
        # sliding_window number even when use_sliding_window is false, where it must be ignored.
        old.pop("layer_types")
        if not old["use_sliding_window"]:
            old["sliding_window"] = 8
    if model_type == "smollm3":
        # Left to be derived from use_sliding_window and the NoPE layers instead, and those from
        # no_rope_layer_interval when it gives the same list.
        old.pop("layer_types")
        interval = old["no_rope_layer_interval"]
        if old["no_rope_layers"] == [int((i + 1) % interval != 0) for i in range(old["num_hidden_layers"])]:
            old.pop("no_rope_layers")
    if model_type == "glm4":
        old["partial_rotary_factor"] = rope["partial_rotary_factor"]  # top-level, as GLM-4-0414 configs have it
    if model_type == "cohere2":
        # Published Cohere 2 configs state the pattern, not the layer types.
        types = old.pop("layer_types")
        old["sliding_window_pattern"] = types.index("full_attention") + 1
    if model_type == "exaone4":
        old.pop("layer_types")  # derived from the integer sliding_window_pattern instead
    if model_type == "granitemoehybrid":
        # Published Granite 4 configs: the older key and names of the layer types, infinity as JSON
        # (Python's json) spells it
        old["layers_block_type"] = [{"linear_attention": "mamba"}.get(t, "attention") for t in old.pop("layer_types")]
        old["time_step_limit"] = [0.0, float("inf")]
    if model_type == "qwen3_5_text":
        old.pop("layer_types")  # derived from full_attention_interval instead
        old["full_attention_interval"] = 2
    if model_type == "lfm2":
        # The first LFM2 configs: attention layers by index, and block_ff_dim / tie_embedding.
        types = old.pop("layer_types")
        old["full_attn_idxs"] = [i for i, t in enumerate(types) if t == "full_attention"]
        old["block_ff_dim"] = old.pop("intermediate_size")
        old["tie_embedding"] = old.pop("tie_word_embeddings")
    if model_type in ("gemma2", "gemma3_text"):
        # Derived from the alternation (Gemma 2) or sliding_window_pattern (Gemma 3) instead;
        # Gemma 2 configs also carry a `hidden_act` that transformers ignores.
        old.pop("layer_types")
        if model_type == "gemma2":
            old["hidden_act"] = "gelu_pytorch_tanh"
    return old


def build_tiny_model(
    kind: str, folder: Path, *, config_style: str = "new", sharded: bool = False, seed: int = 0
) -> Path:
    """Write a complete tiny HF model folder of `kind` into `folder` and return it."""
    model_type, overrides = _KIND_CONFIGS[kind]
    if config_style not in CONFIG_STYLES:
        raise ValueError(f"unknown config_style {config_style!r}")
    add_bos = model_type not in ("qwen2", "qwen3")  # Qwen checkpoints add no BOS
    tokenizer = Tokenizer.from_str(_tokenizer_json(add_bos))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    eos_ids: int | list[int] = [ids[IM_END], ids[EOS]] if add_bos else ids[IM_END]

    config = AutoConfig.for_model(
        model_type,
        **{**_BASE, **overrides},
        vocab_size=vocab,
        bos_token_id=ids[BOS],
        eos_token_id=eos_ids,
        dtype="float32",
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed + zlib.crc32(kind.encode()))  # different weights for every kind
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=eos_ids)

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="150KB" if sharded else "50GB")
    if config_style == "old":
        config_path = folder / "config.json"
        config_path.write_text(json.dumps(_to_old_style(json.loads(config_path.read_text())), indent=2))

    (folder / "tokenizer.json").write_text(_tokenizer_json(add_bos))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": None,
        "unk_token": None,  # else transformers' Qwen2Tokenizer adds an out-of-model <|endoftext|>
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder
