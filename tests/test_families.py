"""The family registry: one entry per architecture, consistent with gguf-py and with the test suite.

The per-family behaviour is tested by the parity tests (tests/test_parity.py, test_moe.py and a
module per family); these check what keeps the registry honest as families are added: no name
claimed twice, GGUF names that are gguf-py's own (what llama.cpp's converter writes), and a tiny
model plus a GGUF exporter entry for every family, so none is left without a parity test.
"""

from __future__ import annotations

import gguf
import pytest

from llmchat.engine.checkpoint import check_names
from llmchat.engine.config import from_hf_config
from llmchat.engine.errors import ModelLoadError, UnsupportedArchitectureError
from llmchat.engine.families import BY_CLASS, BY_GGUF, BY_MODEL_TYPE, FAMILIES, MULTIMODAL, SUPPORTED_ARCHITECTURES
from llmchat.engine.families.base import BLOCK_NAMES
from llmchat.engine.package import open_package
from tests.gguf_export import GGUF_ARCH
from tests.tiny_models import KINDS, MOE_KINDS

_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def test_no_name_is_claimed_by_two_families() -> None:
    assert len(BY_MODEL_TYPE) == len(FAMILIES)
    assert len(BY_CLASS) == sum(len(family.hf_classes) for family in FAMILIES)
    assert len(BY_GGUF) == sum(1 for family in FAMILIES if family.gguf)
    assert len({family.name for family in FAMILIES}) == len(FAMILIES)
    assert tuple(BY_CLASS) == SUPPORTED_ARCHITECTURES
    assert not set(MULTIMODAL) & set(BY_CLASS)  # a wrapper is read through its text model


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.gguf], ids=lambda f: f.gguf)
def test_gguf_names_are_gguf_pys_for_that_architecture(family) -> None:
    """The architecture name and every tensor name a family adds to (or renames in) the shared
    table are in gguf-py's MODEL_TENSORS for that architecture: the names the converter writes."""
    assert family.gguf in _ARCH_BY_NAME, f"{family.gguf!r} is not a gguf-py architecture"
    arch = _ARCH_BY_NAME[family.gguf]
    known = {gguf.TENSOR_NAMES[t].removeprefix("blk.{bid}.") for t in gguf.MODEL_TENSORS[arch]}
    own = [part for part, hf in family.gguf_names.items() if BLOCK_NAMES.get(part) != hf]
    assert [part for part in own if part not in known] == []


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_every_family_has_a_gguf_exporter_entry_matching_its_architecture(family) -> None:
    """tests/gguf_export.py mirrors the converter for each family (the GGUF half of its parity test);
    a family written as its own architecture is written under the name the registry reads."""
    assert family.model_type in GGUF_ARCH, f"no GGUF export for {family.model_type} in tests/gguf_export.py"
    written = gguf.MODEL_ARCH_NAMES[GGUF_ARCH[family.model_type]]
    if family.gguf:
        assert written == family.gguf
    else:  # converted as another architecture (Mistral and Mixtral as llama)
        assert written in BY_GGUF


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_a_config_names_its_family_by_class_or_by_model_type(family) -> None:
    """`architectures` decides; a config without it is read by its model_type."""
    minimal = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 32}
    minimal |= {"intermediate_size": 96, "shared_intermediate_size": 96, "num_experts": 4, "num_experts_per_tok": 2}
    minimal |= {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "linear_num_value_heads": 16}
    by_class = from_hf_config({**minimal, "architectures": [family.hf_classes[0]]})
    by_type = from_hf_config({**minimal, "model_type": family.model_type})
    assert by_class.architecture == by_type.architecture == family.name


def test_a_multimodal_wrapper_without_its_text_config_is_refused_by_name() -> None:
    for wrapper, text in MULTIMODAL.items():
        with pytest.raises(UnsupportedArchitectureError, match=f"{wrapper}.*text_config.*{text}"):
            from_hf_config({"architectures": [wrapper], "hidden_size": 8})


_EVERY_KIND = [*KINDS, *MOE_KINDS]


@pytest.mark.parametrize("kind", _EVERY_KIND)
def test_checking_the_names_alone_accepts_every_tiny_model_and_refuses_one_tensor_short(
    kind: str, tiny_model, tiny_gguf
) -> None:
    """`llmchat info` checks a checkpoint's names as the loader would (checkpoint.check_names): every
    family's folder and GGUF passes; without one of its layer tensors, neither does."""
    for path in (tiny_model(kind), tiny_gguf(kind)):
        package = open_package(path)
        names = package.weights.tensor_names()
        check_names(package.config, names)
        dropped = sorted(n for n in names if ".layers.1." in n)[0]
        with pytest.raises(ModelLoadError, match="checkpoint is missing"):
            check_names(package.config, names - {dropped})


def test_checking_the_names_refuses_a_tensor_of_another_family(tiny_model) -> None:
    package = open_package(tiny_model("llama"))
    names = package.weights.tensor_names() | {"model.layers.0.self_attn.q_norm.weight"}  # a Qwen3 q/k norm
    with pytest.raises(ModelLoadError, match="does not fit this configuration"):
        check_names(package.config, names)
