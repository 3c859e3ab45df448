"""LFM2's gated short convolution: the token mixer of its non-attention layers.

in_proj maps each token to three vectors B, C and x; B * x runs through a causal depthwise
convolution over the last `conv_kernel` positions (one filter per channel), and C gates its output
before out_proj: y = out_proj(C * conv(B * x)). A layer looks back a fixed `conv_kernel - 1`
positions, so instead of a growing KV cache it keeps a fixed state: the B * x of the positions
before the next one ([conv_kernel - 1, hidden], zeros before the first token), held by the cache
(kv_cache.KVCache.state) and updated in place by every forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmchat.engine.config import ModelConfig
from llmchat.engine.kv_cache import StateSpec

if TYPE_CHECKING:
    from llmchat.engine.kv_cache import KVCache


def conv_state(config: ModelConfig) -> tuple[StateSpec, ...]:
    """The fixed state of one short-convolution layer: the last kernel - 1 inputs of every channel."""
    return (StateSpec((config.conv_kernel - 1, config.hidden_size)),)


class ShortConv(nn.Module):
    """y = out_proj(C * causal_depthwise_conv(B * x)), with (B, C, x) = in_proj(h)."""

    def __init__(self, config: ModelConfig, layer: int, transposed: bool) -> None:
        super().__init__()
        from llmchat.engine.model import Linear  # model.py imports this module

        hidden = config.hidden_size
        self.layer, self.hidden = layer, hidden
        self.in_proj = Linear(hidden, 3 * hidden, bias=config.conv_bias, transposed=transposed)
        self.out_proj = Linear(hidden, hidden, bias=config.conv_bias, transposed=transposed)
        # as the checkpoint stores it: nn.Conv1d's [channels, 1, kernel]
        self.weight = nn.Parameter(torch.empty(hidden, 1, config.conv_kernel))
        self.bias = nn.Parameter(torch.empty(hidden)) if config.conv_bias else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        """Rows x [n, hidden] at positions [start, start + n); the layer's state in `cache` must be the
        one after position start - 1 (the cache sees to it: truncate, snapshots). RoPE tables unused."""
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        (state,) = cache.state(self.layer)  # [kernel - 1, hidden]
        window = torch.cat((state, b * v))  # [kernel - 1 + n, hidden]
        mixed = F.conv1d(window.t()[None], self.weight, self.bias, groups=self.hidden)[0].t()  # [n, hidden]
        state.copy_(window[window.shape[0] - state.shape[0] :])
        return self.out_proj(c * mixed)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, kernel={self.weight.shape[-1]}"
