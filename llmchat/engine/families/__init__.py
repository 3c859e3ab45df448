"""One entry per architecture llmchat runs: the registry config.py and gguf.py read.

Adding an architecture is one `Family` (families/base.py) in the module of its lineage, listed
here; where its math differs from the shared layer, one small module per layer kind (moe.py,
delta_net.py, short_conv.py, mamba2.py) that model.py builds from ModelConfig's fields.
"""

from __future__ import annotations

from llmchat.engine.families import cohere, exaone, gemma, glm, gpt_oss, granite, lfm2, llama, olmo, qwen
from llmchat.engine.families.base import EXPERT_TENSORS, ExpertLayout, Family

__all__ = [
    "BY_CLASS",
    "BY_GGUF",
    "BY_MODEL_TYPE",
    "EXPERT_TENSORS",
    "ExpertLayout",
    "FAMILIES",
    "Family",
    "MULTIMODAL",
    "SUPPORTED_ARCHITECTURES",
]

FAMILIES: tuple[Family, ...] = (
    *llama.FAMILIES,
    *qwen.FAMILIES,
    *gemma.FAMILIES,
    *olmo.FAMILIES,
    *exaone.FAMILIES,
    *cohere.FAMILIES,
    *glm.FAMILIES,
    *granite.FAMILIES,
    *lfm2.FAMILIES,
    *gpt_oss.FAMILIES,
)

BY_MODEL_TYPE: dict[str, Family] = {family.model_type: family for family in FAMILIES}
BY_CLASS: dict[str, Family] = {name: family for family in FAMILIES for name in family.hf_classes}
BY_GGUF: dict[str, Family] = {family.gguf: family for family in FAMILIES if family.gguf}
# multimodal wrapper class → the text model's class (its config nests it under text_config)
MULTIMODAL: dict[str, str] = {name: family.hf_classes[0] for family in FAMILIES for name in family.multimodal_classes}
SUPPORTED_ARCHITECTURES = tuple(BY_CLASS)
