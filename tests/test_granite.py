"""Granite 3 (GraniteForCausalLM; GGUF architecture `granite`): llama with four multipliers.

embedding_multiplier scales the token embeddings, attention_multiplier is the softmax scale (in
place of head_dim ** -0.5), residual_multiplier scales each attention and MLP output before its
residual add, and the logits are divided by logits_scaling. The tiny `granite` kind (12, 0.2, 0.3,
3) also runs through every KINDS-parametrized test of test_parity.py; here each multiplier is shown
to matter on its own, the config defaults are GraniteConfig's, and GGUF files carry the four
scales under llama.cpp's names (llama.cpp's own defaults where a key is missing).
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
from gguf import GGMLQuantizationType as Q
from transformers import GraniteConfig

import llmchat
from llmchat.engine.config import from_hf_config, load_hf_config
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.gguf import GGUFFile
from tests import gguf_export
from tests.gguf_export import export_gguf, quantized_copy
from tests.hf_reference import hf_greedy, hf_logits, hf_model, llmchat_greedy, random_ids, vocab_size

TOL = 1e-4
NEW_TOKENS = 20
TinyModelFactory = Callable[..., Path]
MULTIPLIERS = {"embedding_multiplier": 12.0, "attention_multiplier": 0.2, "residual_multiplier": 0.3}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def granite(tiny_model: TinyModelFactory) -> Path:
    return tiny_model("granite")


@pytest.fixture(scope="module")
def granite_gguf(granite: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`granite_gguf(qtype=F32)` -> the tiny folder exported as llama.cpp's converter would, cached."""
    root = tmp_path_factory.mktemp("granite-gguf")
    made: dict[Q, Path] = {}

    def get(qtype: Q = Q.F32) -> Path:
        if qtype not in made:
            made[qtype] = export_gguf(granite, root / f"granite-{qtype.name}.gguf", qtype=qtype)
        return made[qtype]

    return get


def _greedy(model: Any, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    return llmchat_greedy(model, prompt, n)


# --- config ---------------------------------------------------------------------------------------

_MINIMAL = {
    "architectures": ["GraniteForCausalLM"],
    "model_type": "granite",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 300,
}


@pytest.mark.parametrize(
    "keys",
    [
        {},  # every multiplier left to GraniteConfig's default of 1
        MULTIPLIERS | {"logits_scaling": 3.0},
        {"embedding_multiplier": 12, "logits_scaling": 16, "attention_multiplier": 0.0078125},  # granite-3 8b style
        {"residual_multiplier": 0.22, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
    ],
)
def test_config_follows_graniteconfig(keys: dict[str, Any]) -> None:
    """Absent keys take GraniteConfig's defaults: the attention scale is then 1, not head_dim ** -0.5."""
    raw = {**_MINIMAL, **keys}
    ours = from_hf_config(raw)
    reference = GraniteConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    assert ours.architecture == "granite"
    assert ours.attn_scale == reference.attention_multiplier
    assert (ours.embed_scale or 1.0) == reference.embedding_multiplier
    assert (ours.residual_scale or 1.0) == reference.residual_multiplier
    assert (ours.logit_scale or 1.0) == pytest.approx(1.0 / reference.logits_scaling, rel=1e-15)
    assert ours.rms_norm_eps == reference.rms_norm_eps
    assert ours.max_position_embeddings == reference.max_position_embeddings
    assert ours.tie_word_embeddings == reference.tie_word_embeddings
    assert ours.rope.theta == reference.rope_parameters["rope_theta"]
    assert ours.num_kv_heads == reference.num_key_value_heads
    assert ours.qkv_bias == ours.o_bias == reference.attention_bias
    assert ours.mlp_bias == reference.mlp_bias


def test_defaults_of_one_are_no_work() -> None:
    """Multipliers of 1 leave the embedding, residual and logits untouched (None); the attention
    scale of 1 stays, since None would mean head_dim ** -0.5."""
    ours = from_hf_config(_MINIMAL)
    assert (ours.embed_scale, ours.residual_scale, ours.logit_scale, ours.attn_scale) == (None, None, None, 1.0)


def test_tiny_model_has_the_multipliers(granite: Path) -> None:
    config = load_hf_config(granite)
    assert (config.embed_scale, config.attn_scale, config.residual_scale) == (12.0, 0.2, 0.3)
    assert config.logit_scale == 1.0 / 3.0  # logits_scaling 3 becomes a multiplier
    assert config.attn_scale != config.head_dim**-0.5


# --- each multiplier matters ------------------------------------------------------------------------


def _ignore(model: Any, multiplier: str) -> None:
    """Make the loaded engine model behave as if it did not know `multiplier`."""
    if multiplier == "embedding_multiplier":
        model.model.embed_scale = None
    elif multiplier == "attention_multiplier":
        for block in model.model.layers:
            block.attn.scale = None  # SDPA's head_dim ** -0.5
    elif multiplier == "residual_multiplier":
        for block in model.model.layers:
            block.residual_scale = None
    else:
        model.model.logit_scale = None


@pytest.mark.parametrize("multiplier", [*MULTIPLIERS, "logits_scaling"])
def test_each_multiplier_is_needed_for_parity(multiplier: str, granite: Path) -> None:
    """The engine matches transformers with all four; ignoring any one of them misses by far more
    than the tolerance, so the parity tests would catch a multiplier that is read wrong."""
    ids = random_ids(40, vocab_size(granite), seed=1)
    expected = hf_logits(hf_model(granite), ids)
    model = llmchat.load(granite, device="cpu", dtype="float32")
    assert (model.logits(ids) - expected).abs().max().item() <= TOL
    _ignore(model, multiplier)
    diff = (model.logits(ids) - expected).abs().max().item()
    assert diff > 100 * TOL, f"ignoring {multiplier} moves the logits by only {diff:.3g}"


def test_greedy_tokens_vary(granite: Path) -> None:
    """Self-check: the tiny model's greedy answer is not one token repeated (the residual stream is
    not just the scaled embedding), so greedy parity says something."""
    tokens = hf_greedy(hf_model(granite), random_ids(12, vocab_size(granite), seed=2), NEW_TOKENS)
    assert len(set(tokens)) >= 10, tokens


def test_half_precision_stays_close(granite: Path) -> None:
    """bfloat16: the engine's logits stay as close to transformers' bfloat16 ones as rounding allows."""
    from transformers import AutoModelForCausalLM

    ids = random_ids(40, vocab_size(granite), seed=1)
    reference = AutoModelForCausalLM.from_pretrained(granite, dtype=torch.bfloat16).eval()
    expected = hf_logits(reference, ids).float()
    got = llmchat.load(granite, device="cpu", dtype="bfloat16").logits(ids).float()
    exact = hf_logits(hf_model(granite), ids)
    assert (got - expected).abs().mean().item() <= (expected - exact).abs().mean().item() * 2


# --- GGUF -------------------------------------------------------------------------------------------


def test_gguf_metadata_has_llama_cpp_names(granite_gguf: Callable[..., Path]) -> None:
    """GraniteModel's keys: granite.embedding_scale, .residual_scale, .attention.scale, .logit_scale
    (gguf-py's Keys), stored as float32; no head_dim (the converter drops it)."""
    metadata = GGUFFile(granite_gguf()).metadata
    assert metadata["general.architecture"] == "granite"
    expected = {
        gguf.Keys.LLM.EMBEDDING_SCALE: 12.0,
        gguf.Keys.LLM.RESIDUAL_SCALE: 0.3,
        gguf.Keys.Attention.SCALE: 0.2,
        gguf.Keys.LLM.LOGIT_SCALE: 3.0,
    }
    for key, value in expected.items():
        assert metadata[key.format(arch="granite")] == float(np.float32(value)), key
    assert "granite.attention.key_length" not in metadata


def test_gguf_config_is_the_folders(granite: Path, granite_gguf: Callable[..., Path]) -> None:
    """The metadata round trip: the GGUF's config is the folder's, up to float32 storage."""
    file = GGUFFile(granite_gguf())
    raw = file.hf_config()
    assert raw["architectures"] == ["GraniteForCausalLM"]
    assert raw["logits_scaling"] == 3.0 and raw["embedding_multiplier"] == 12.0
    ours, folder = file.model_config(), load_hf_config(granite)

    def rounded(config: Any) -> Any:
        f32 = lambda value: float(np.float32(value))  # noqa: E731
        return config.with_changes(
            attn_scale=f32(config.attn_scale),
            residual_scale=f32(config.residual_scale),
            rms_norm_eps=f32(config.rms_norm_eps),
            eos_token_ids=(),  # GGUF keeps the tokenizer's one EOS id
            dtype=None,
        )

    assert rounded(ours) == rounded(folder)


def test_gguf_without_the_optional_keys_takes_llama_cpp_defaults(granite: Path, tmp_path: Path) -> None:
    """A config without the multipliers converts without their keys (the converter writes only the
    ones it finds). llama.cpp then scales by nothing and attends with head_dim ** -0.5, where
    transformers' GraniteConfig would use an attention scale of 1: each loader keeps its own rule."""
    folder = Path(shutil.copytree(granite, tmp_path / "plain"))
    config = json.loads((folder / "config.json").read_text())
    for key in MULTIPLIERS:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    metadata = GGUFFile(export_gguf(folder, tmp_path / "plain.gguf")).metadata
    assert "granite.attention.scale" not in metadata and "granite.embedding_scale" not in metadata
    from_gguf = GGUFFile(tmp_path / "plain.gguf").model_config()
    assert from_gguf.attn_scale == from_gguf.head_dim**-0.5 == 0.25
    assert from_gguf.embed_scale is None and from_gguf.residual_scale is None
    assert from_gguf.logit_scale == 1.0 / 3.0
    assert load_hf_config(folder).attn_scale == 1.0


def test_gguf_without_rope_is_refused(granite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's granite turns RoPE off with rope.scaling.finetuned false; llmchat says so in one line."""
    original = gguf_export._write_hparams

    def without_rope(writer: gguf.GGUFWriter, config: dict[str, Any], arch: gguf.MODEL_ARCH) -> None:
        original(writer, config, arch)
        writer.add_rope_scaling_finetuned(False)

    monkeypatch.setattr(gguf_export, "_write_hparams", without_rope)
    path = export_gguf(granite, tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="rope.scaling.finetuned") as info:
        GGUFFile(path).model_config()
    assert "\n" not in str(info.value)


def test_f32_gguf_gives_transformers_logits_and_tokens(granite: Path, granite_gguf: Callable[..., Path]) -> None:
    """Q/K rows un-permuted (GraniteModel is a LlamaModel) and the four scales read back: the F32
    GGUF gives the folder's and transformers' logits and greedy tokens."""
    ours = llmchat.load(granite_gguf(), device="cpu", dtype="float32")
    reference = llmchat.load(granite, device="cpu", dtype="float32")
    ids = random_ids(40, vocab_size(granite), seed=0)
    diff = (ours.logits(ids) - reference.logits(ids)).abs().max().item()
    assert diff <= TOL, f"GGUF logits differ from the folder's by {diff:.2e}"
    hf_diff = (ours.logits(ids) - hf_logits(hf_model(granite), ids)).abs().max().item()
    assert hf_diff <= TOL, f"GGUF logits differ from transformers' by {hf_diff:.2e}"
    prompt = ids[:12]
    assert _greedy(ours, prompt) == _greedy(reference, prompt) == hf_greedy(hf_model(granite), prompt, NEW_TOKENS)


@pytest.mark.parametrize(("qtype", "layout"), [(Q.Q8_0, "int8"), (Q.Q4_0, "int4"), (Q.Q5_1, "int8")])
def test_quantized_gguf_dequantized_and_packed(
    qtype: Q, layout: str, granite: Path, granite_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    """Dequantized, a quantized GGUF is transformers' model of the quantized weights (within TOL);
    packed (the default), its logits stay close to that and its greedy picks are near-best ones."""
    path = granite_gguf(qtype)
    plain = llmchat.load(path, device="cpu", dtype="float32", packed=False)
    roundtrip = quantized_copy(granite, tmp_path / "rt", qtype)
    ids = random_ids(40, vocab_size(granite), seed=0)
    reference = hf_logits(hf_model(roundtrip), ids)
    assert (plain.logits(ids) - reference).abs().max().item() <= TOL
    unquantized = hf_logits(hf_model(granite), ids)
    assert (unquantized - reference).abs().max().item() > 1e-3, "the weights were not quantized"

    packed = llmchat.load(path, device="cpu", dtype="float32")
    assert f"{qtype.name} → {layout}" in packed.info.packing
    ours = packed.logits(ids)
    error = (ours - reference).abs()
    assert error.max().item() < 0.06 * reference.abs().max().item()
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.9
    prompt = ids[:8]
    tokens = _greedy(packed, prompt, 8)
    sequence = prompt + tokens
    got, expected = packed.logits(sequence)[len(prompt) - 1 : -1], plain.logits(sequence)[len(prompt) - 1 : -1]
    miss = (got - expected).abs().amax(-1)
    shortfall = expected.amax(-1) - expected[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert (shortfall <= 2 * miss).all(), (shortfall, miss)
