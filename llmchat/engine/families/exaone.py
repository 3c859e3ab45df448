"""LG's EXAONE 4: norms after attention and MLP; with a window, the sliding layers rotate and the
global ones attend without positions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmchat.engine.errors import ModelLoadError
from llmchat.engine.families.base import NORM_AFTER_BLOCK_NAMES, Family, Raw, attention_layer_types

if TYPE_CHECKING:
    from llmchat.engine.gguf import GGUFFile


def _pattern(raw: Raw, num_layers: int, source: str) -> tuple[bool, ...]:
    """Per layer: sliding or not, from `sliding_window_pattern` (when there are no layer_types).

    An int p: every p-th layer is global, the others slide (Exaone4Config.__post_init__). A string
    of "L" (local) and "G" (global), e.g. "LLLG": repeated from layer 0, the last layer always
    global (Exaone4Config's docstring; transformers itself cannot expand a string, so published
    configs carry layer_types as well). None or 0: no layer slides.
    """
    pattern = raw.get("sliding_window_pattern")
    if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:
        return tuple(i != num_layers - 1 and pattern[i % len(pattern)] == "L" for i in range(num_layers))
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        return tuple(pattern > 0 and (i + 1) % pattern != 0 for i in range(num_layers))
    if pattern is None:
        return (False,) * num_layers
    raise ModelLoadError(f"{source}: unsupported sliding_window_pattern {pattern!r} (an int or a string of L and G)")


def _fields(raw: Raw, num_layers: int, source: str) -> dict[str, Any]:
    """Exaone4Config: `layer_types`, else `sliding_window_pattern`; Exaone4Attention rotates only the
    sliding layers when a window is configured (0 or none: every layer rotates, none slides)."""
    window = raw.get("sliding_window")
    if not window:  # 0: what a GGUF without sliding layers says (as None does)
        return {}
    sliding = attention_layer_types(raw, num_layers, source) or _pattern(raw, num_layers, source)
    return {"sliding_window": int(window), "sliding_layers": sliding, "rope_layers": sliding}


# llama.cpp's exaone4 without a sliding_window_pattern key: only a 64-layer model (EXAONE 4.0 32B)
# slides, every 4th layer global, over 4096 tokens unless the file says otherwise.
_SWA = {"layers": 64, "pattern": 4, "window": 4096}


def _gguf(file: GGUFFile, raw: Raw) -> Raw:
    """The per-layer `sliding_window_pattern` the converter writes (from layer_types or the config's
    pattern), else llama.cpp's fixed layout (_SWA). A file without sliding layers says
    sliding_window 0, which reads as "no window" (the family's default window would otherwise leave
    every layer without RoPE, as in transformers)."""
    layers = int(file.key("block_count") or 0)
    window = file.key("attention.sliding_window")
    pattern = file.key("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != layers:
            key = "exaone4.attention.sliding_window_pattern"
            raise ModelLoadError(f"{file.path}: {key} has {len(pattern)} entries for {layers} layers")
        sliding = [bool(p) for p in pattern]
    elif layers == _SWA["layers"]:
        step = _SWA["pattern"]
        sliding = [i % step < step - 1 for i in range(layers)]
        window = window or _SWA["window"]
    else:
        sliding = [False] * layers
    if not window or not any(sliding):
        return {"sliding_window": 0}
    return {"sliding_window": window, "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding]}


EXAONE4 = Family(
    "exaone4",
    "exaone4",
    ("Exaone4ForCausalLM",),
    qkv_bias=False,
    o_bias=False,
    qk_norm=True,
    norm_after=True,
    defaults={
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "sliding_window": 4096,
        "sliding_window_pattern": 4,
    },
    fields=_fields,
    gguf="exaone4",
    gguf_names=NORM_AFTER_BLOCK_NAMES,
    gguf_config=_gguf,
)

FAMILIES = (EXAONE4,)
