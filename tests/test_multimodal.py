"""Multimodal checkpoints whose language model llmchat runs: Gemma 3 and Qwen3.5 are published as
*ForConditionalGeneration, the text model's config under text_config and its weights under a prefix
(language_model.model for Gemma 3, model.language_model for Qwen3.5) next to a vision tower. llmchat
loads the language model only and must give the logits transformers' whole model gives on text.

The tiny multimodal folders are made from the tiny text kinds: the same weights, placed where the
multimodal class keeps them, with a small random vision tower beside them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    PreTrainedModel,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
)

import llmchat
from tests.hf_reference import hf_model, random_ids

TOL = 1e-4
TinyModelFactory = Callable[..., Path]


pytestmark = pytest.mark.usefixtures("one_thread")


def _multimodal_folder(text_folder: Path, full: PreTrainedModel, out: Path, prefix: str) -> Path:
    """`full` given the text model's weights (under `prefix`), saved with the text folder's tokenizer."""
    state = {
        (name if name == "lm_head.weight" else name.replace("model.", prefix, 1)): value
        for name, value in hf_model(text_folder).state_dict().items()
    }
    missing, unexpected = full.load_state_dict(state, strict=False)
    language = prefix.rstrip(".")
    assert not unexpected and all(language not in name for name in missing), missing
    full.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(text_folder / name, out / name)
    return out


def _check(full: PreTrainedModel, folder: Path, vocab: int, architecture: str) -> None:
    ids = random_ids(40, vocab, seed=1)
    with torch.no_grad():
        expected = full.eval()(torch.tensor([ids])).logits[0]
    model = llmchat.load(folder, device="cpu", dtype="float32")
    assert model.config.architecture == architecture
    diff = (model.logits(ids) - expected).abs().max().item()
    assert diff <= TOL, f"{architecture}: {diff:.2e}"


def test_gemma3_conditional_generation_runs_its_language_model(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    text_folder = tiny_model("gemma3")
    text = AutoConfig.from_pretrained(text_folder)
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    full = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    )
    folder = _multimodal_folder(text_folder, full, tmp_path / "gemma3-multimodal", "model.language_model.")
    saved = (folder / "model.safetensors").read_bytes()[:20000]
    assert b"language_model.model.layers" in saved and b"vision_tower" in saved  # the layout transformers writes
    _check(full, folder, text.vocab_size, "gemma3")


def test_qwen3_5_conditional_generation_runs_its_language_model(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    text_folder = tiny_model("qwen3_5")
    text = AutoConfig.from_pretrained(text_folder)
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
    full = Qwen3_5ForConditionalGeneration(
        Qwen3_5Config(text_config=text.to_dict(), vision_config=vision, tie_word_embeddings=False)
    )
    folder = _multimodal_folder(text_folder, full, tmp_path / "qwen3_5-multimodal", "model.language_model.")
    assert b"model.language_model.layers" in (folder / "model.safetensors").read_bytes()[:20000]
    _check(full, folder, text.vocab_size, "qwen3_5")
