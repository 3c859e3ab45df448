"""GGUF tensor data: where a tensor lies in the file, its blocks dequantized to float32, and the
token embedding served row by row from the memory-mapped file.

Every GGUF type stores a matrix row as a whole number of blocks, so row j is one contiguous byte
range and any set of rows dequantizes on its own, with the same arithmetic as the whole tensor.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from torch import nn


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file and how it is stored."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (GGUF lists the fastest-varying dimension first)
    n_elements: int
    n_bytes: int
    offset: int  # absolute, in bytes


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks (f16 d, 16 bytes of nibbles: low nibbles are values 0-15, high 16-31): d * (q - 8)."""
    blocks = raw.view(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    qs = blocks[:, 2:]
    q = torch.cat((qs & 15, qs >> 4), dim=1).to(torch.int8) - 8
    return q.float().mul_(d).reshape(-1)  # in place: one float32 copy of the matrix, not two


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks (f16 d, f16 m, 16 bytes of nibbles): d * q + m."""
    blocks = raw.view(-1, 20)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    qs = blocks[:, 4:]
    q = torch.cat((qs & 15, qs >> 4), dim=1).float()
    return q.mul_(d).add_(m).reshape(-1)


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks (f16 d, 32 int8): q * d."""
    blocks = raw.view(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    return blocks[:, 2:].contiguous().view(torch.int8).float().mul_(d).reshape(-1)


_E2M1 = torch.tensor((0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12), dtype=torch.float32)  # doubled


def _mxfp4(raw: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks (gpt-oss's experts): an e8m0 exponent byte e, then 16 bytes of e2m1 nibbles (low nibbles
    are values 0-15, high 16-31). The nibbles index the doubled e2m1 values, so each is halved with the
    scale: value * 2 ** (e - 128), what gguf-py's MXFP4.dequantize_blocks computes (e8m0_to_fp32_half)."""
    blocks = raw.view(-1, 17)
    scale = torch.exp2(blocks[:, :1].float() - 128.0)
    qs = blocks[:, 1:]
    q = torch.cat((qs & 15, qs >> 4), dim=1).long()
    return _E2M1[q].mul_(scale).reshape(-1)


# The types most GGUF weights come in, dequantized with torch (gguf-py's numpy code took 1.7 s of
# the demo model's load); the same arithmetic in the same order, so the same float32 values.
_TORCH_DEQUANTIZE = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.MXFP4: _mxfp4,
}


def dequantize_bytes(raw: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 values of `shape` from `raw`, the bytes (uint8, writable) of a tensor stored as
    `kind`, or of some of its rows. The result may share memory with `raw`."""
    fast = _TORCH_DEQUANTIZE.get(kind)
    if fast is not None:
        return fast(torch.from_numpy(raw).reshape(-1)).reshape(shape)
    values = dequantize(raw.reshape(quant_shape_to_byte_shape(shape, kind)), kind)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # absent on Windows


class GGUFEmbedding(nn.Module):
    """The token embedding read from the GGUF file itself: a read-only memory map of the tensor's
    bytes, of which each pass gathers and dequantizes only the rows of its ids.

    Why: a pass needs the rows of its tokens and nothing else. Held like the other weights, an
    untied embedding is a float copy of its own (2 GiB in float32 for a 128k x 4096 vocabulary),
    and a tied one would keep int8 codes beside the packed output projection only to serve rows.
    Mapped, it holds no memory, and its values are the file's own, dequantized exactly as
    GGUFFile.read_tensor does. The module holds the map, so it stays valid as long as the model
    lives. The rows are dequantized on the host and copied to the model's device (a CUDA model's
    embedding stays on the host, as llama.cpp keeps it).

    Touching one row maps the 64 KiB around it into the process (the kernel's fault-around, which
    MADV_RANDOM does not stop): 2048 random rows of Gemma 3's embedding left 95 MiB of it counted
    in RSS. So each gather hands the map's pages back (MADV_DONTNEED; the data stays in the OS page
    cache) and the process's memory does not grow with the tokens a chat has seen. Measured on 2
    EPYC cores: +23 us for one row, +4 ms for 512 random rows (their pages are faulted in again).
    """

    def __init__(self, path: Path, info: TensorInfo, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = info.shape
        self.kind = info.type
        self.file_bytes = info.n_bytes
        self.device, self.dtype = device, dtype
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY  # a map begins on a granule
        with open(path, "rb") as handle:
            self._map = mmap.mmap(
                handle.fileno(), info.offset + info.n_bytes - start, access=mmap.ACCESS_READ, offset=start
            )
        if hasattr(mmap, "MADV_RANDOM"):  # rows are read in token order: no read-ahead around them
            self._map.madvise(mmap.MADV_RANDOM)
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset - start)
        self._rows = data.reshape(self.num_embeddings, -1)  # [rows, bytes per row]: a view of the map

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for `ids` (any shape) as [*ids.shape, embedding_dim] in the model's device and dtype."""
        index = ids.reshape(-1).cpu().numpy()
        if index.size and (index.min() < 0 or index.max() >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        picked = self._rows[index]  # one gather of whole rows, copied off the map
        if _DONTNEED is not None:
            self._map.madvise(_DONTNEED)
        values = dequantize_bytes(picked, self.kind, (index.size, self.embedding_dim))
        return values.reshape(*ids.shape, self.embedding_dim).to(device=self.device, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}x{self.embedding_dim}, {self.kind.name}, mapped from the file"
