"""SmolLM3: layers without RoPE (`no_rope_layers` / `no_rope_layer_interval`), its sliding-window
rule, and the llama.cpp `smollm3` GGUF architecture (whose NoPE step is fixed at 4).

The `smollm3` kind also runs through every KINDS-parametrized test of test_parity.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import SmolLM3Config

from llmchat.engine.config import from_hf_config, load_hf_config
from llmchat.engine.gguf import GGUFFile
from tests.gguf_export import export_gguf
from tests.hf_reference import hf_greedy, hf_logits, hf_model, llmchat_greedy, random_ids

TOL = 1e-4
NEW_TOKENS = 20
TinyModelFactory = Callable[..., Path]


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(vocab: int, n: int, seed: int) -> list[int]:
    return random_ids(n, vocab, seed)


def _hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    return hf_logits(hf_model(folder), ids)


def _hf_greedy(folder: Path, prompt: list[int]) -> list[int]:
    return hf_greedy(hf_model(folder), prompt, NEW_TOKENS)


def _greedy(model: Any, prompt: list[int]) -> list[int]:
    return llmchat_greedy(model, prompt, NEW_TOKENS)


_MINIMAL = {
    "architectures": ["SmolLM3ForCausalLM"],
    "model_type": "smollm3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "vocab_size": 300,
}


@pytest.mark.parametrize(
    "keys",
    [
        {"num_hidden_layers": 8},
        {"num_hidden_layers": 7, "no_rope_layer_interval": 3},
        {"num_hidden_layers": 5, "no_rope_layers": [0, 1, 1, 0, 1]},
        {"num_hidden_layers": 8, "use_sliding_window": True, "sliding_window": 16},
        {"num_hidden_layers": 6, "use_sliding_window": True, "sliding_window": 16, "no_rope_layer_interval": 2},
        {"num_hidden_layers": 4, "use_sliding_window": False, "sliding_window": 16},
        {"num_hidden_layers": 4, "use_sliding_window": True},  # no window: nothing slides
    ],
)
def test_rope_and_window_layout_follow_the_config_class(keys: dict[str, Any]) -> None:
    """RoPE layers, sliding layers and the window are SmolLM3Config's (absent keys take its defaults)."""
    raw = {**_MINIMAL, **keys}
    ours = from_hf_config(raw)
    reference = SmolLM3Config(**{k: v for k, v in raw.items() if k != "architectures"})
    assert ours.architecture == "smollm3"
    assert ours.rope_layers == tuple(bool(flag) for flag in reference.no_rope_layers)
    slides = tuple(bool(reference.use_sliding_window and t == "sliding_attention") for t in reference.layer_types)
    assert tuple(ours.layer_window(i) is not None for i in range(ours.num_layers)) == slides
    assert ours.sliding_window == (reference.sliding_window if any(slides) else None)
    assert ours.rope.theta == reference.rope_parameters["rope_theta"] == 2_000_000.0
    assert ours.tie_word_embeddings == reference.tie_word_embeddings
    assert ours.max_position_embeddings == reference.max_position_embeddings


def test_short_no_rope_layers_is_refused() -> None:
    from llmchat.engine.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no_rope_layers"):
        from_hf_config({**_MINIMAL, "num_hidden_layers": 4, "no_rope_layers": [1, 1, 1]})


def test_tiny_model_has_a_layer_without_rope(tiny_model: TinyModelFactory) -> None:
    """Layer 3 of the tiny model attends without positions, and skipping its RoPE is what matches."""
    import llmchat

    folder = tiny_model("smollm3")
    config = load_hf_config(folder)
    assert config.rope_layers == (True, True, True, False)
    ids = _ids(config.vocab_size, 40, seed=1)
    expected = _hf_logits(folder, ids)
    model = llmchat.load(folder, device="cpu", dtype="float32")
    assert [layer.attn.rotates for layer in model.model.layers] == [True, True, True, False]
    assert (model.logits(ids) - expected).abs().max().item() <= TOL
    # Rotating every layer instead must be visibly wrong, or the parity tests prove nothing.
    for layer in model.model.layers:
        layer.attn.rotates = True
    assert (model.logits(ids) - expected).abs().max().item() > 1e-2


def test_other_families_rotate_every_layer(tiny_model: TinyModelFactory) -> None:
    assert load_hf_config(tiny_model("llama")).rope_layers == ()


@pytest.mark.parametrize("style", ["new", "old"])
def test_sliding_nope_layers_match_transformers(style: str, tiny_model: TinyModelFactory) -> None:
    """use_sliding_window: the NoPE layers (1 and 3) slide over 8 tokens, in 40-token logits and greedy decoding."""
    import llmchat

    folder = tiny_model("smollm3-sliding", style)
    config = load_hf_config(folder)
    assert config.rope_layers == (True, False, True, False)
    assert tuple(config.layer_window(i) for i in range(4)) == (None, 8, None, 8)
    ids = _ids(config.vocab_size, 40, seed=1)
    model = llmchat.load(folder, device="cpu", dtype="float32")
    diff = (model.logits(ids) - _hf_logits(folder, ids)).abs().max().item()
    assert diff <= TOL, f"max |logit diff| {diff:.3g}"
    prompt = _ids(config.vocab_size, 12, seed=2)
    assert _greedy(model, prompt) == _hf_greedy(folder, prompt)


@pytest.fixture(scope="module")
def smollm3_gguf(tiny_model: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gguf(tiny_model("smollm3"), tmp_path_factory.mktemp("gguf") / "smollm3.gguf")


def test_gguf_architecture_and_config(tiny_model: TinyModelFactory, smollm3_gguf: Path) -> None:
    """general.architecture `smollm3`; its NoPE layers are llama.cpp's fixed every-4th, as in the folder."""
    file = GGUFFile(smollm3_gguf)
    assert file.architecture == "smollm3"
    raw = file.hf_config()
    assert raw["architectures"] == ["SmolLM3ForCausalLM"] and raw["no_rope_layer_interval"] == 4
    ours, folder = file.model_config(), load_hf_config(tiny_model("smollm3"))
    assert ours.rope_layers == folder.rope_layers == (True, True, True, False)
    assert ours.tie_word_embeddings and ours.sliding_window is None
    assert ours.rope == folder.rope and ours.head_dim == folder.head_dim


def test_f32_gguf_gives_the_folders_logits_and_tokens(tiny_model: TinyModelFactory, smollm3_gguf: Path) -> None:
    import llmchat

    folder = tiny_model("smollm3")
    ours = llmchat.load(smollm3_gguf, device="cpu", dtype="float32")
    reference = llmchat.load(folder, device="cpu", dtype="float32")
    ids = _ids(reference.config.vocab_size, 40, seed=0)
    diff = (ours.logits(ids) - reference.logits(ids)).abs().max().item()
    assert diff <= TOL, f"GGUF logits differ from the folder's by {diff:.2e}"
    hf_diff = (ours.logits(ids) - _hf_logits(folder, ids)).abs().max().item()
    assert hf_diff <= TOL, f"GGUF logits differ from transformers' by {hf_diff:.2e}"
    prompt = ids[:12]
    assert _greedy(ours, prompt) == _greedy(reference, prompt) == _hf_greedy(folder, prompt)
