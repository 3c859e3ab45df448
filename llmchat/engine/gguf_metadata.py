"""Reading a GGUF file's key/value metadata and tensor index quickly.

gguf-py's GGUFReader indexes every string of a vocabulary as numpy views when it opens a file,
which takes many seconds for a 150k-token vocabulary with its merges (3.4 of the demo model's 8 s
load); the tokenizer, the CLI's `tokenize` and model loading need only the header, which this
reads straight from a memory map in a fraction of that, with the same values GGUFReader's
`field.contents()` gives. After the metadata come the tensor infos: name, dims (fastest-varying
first), ggml type, offset into the data section, which starts at the next multiple of
`general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmchat.engine.errors import LLMChatError, TokenizerError

_GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Cursor:
    """Reads GGUF values from a memory-mapped file; every read is bounds-checked."""

    def __init__(self, data: mmap.mmap, endian: str, path: Path, error: type[LLMChatError]) -> None:
        self.data, self.endian, self.path, self.error = data, endian, path, error
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise self.error(f"{self.path} is a truncated or corrupt GGUF file: metadata runs past the end")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(self.endian + fmt, self.take(size))[0]

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """A string array; the hot loop of a vocabulary (hundreds of thousands of tokens and merges)."""
        data, pos, size = self.data, self.pos, len(self.data)
        unpack_length = struct.Struct(self.endian + "Q").unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                break
            length = unpack_length(data, pos)[0]
            pos += 8
            if pos + length > size:
                break
            append(data[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        if len(out) < count:
            self.take(size + 1)  # reports the truncation
        return out

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            return self.array(item_type, count)
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise self.error(f"{self.path} is a corrupt GGUF file: unknown value type {value_type}")
        return self.scalar(fmt)

    def array(self, item_type: int, count: int) -> list[Any]:
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:  # numbers: one numpy view instead of `count` unpack calls
            dtype = np.dtype(fmt if fmt != "?" else "bool").newbyteorder("<" if self.endian == "<" else ">")
            return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
        if item_type == _STRING:
            return self.strings(count)
        return [self.value(item_type) for _ in range(count)]


def read_gguf_metadata(path: str | Path, error: type[LLMChatError] = TokenizerError) -> dict[str, Any]:
    """The key/value metadata of a GGUF file, as `{k: f.contents() for k, f in GGUFReader(path).fields.items()}`
    (including GGUFReader's GGUF.version/tensor_count/kv_count entries). Only the header is read.

    Invalid UTF-8 in a string is replaced (U+FFFD) where GGUFReader would raise. Errors are
    `error` (TokenizerError unless the caller wants e.g. ModelLoadError), one line naming the file.
    """
    path = Path(path).expanduser()
    with _mapped(path, error) as (data, _):
        return _read_header(data, path, error)[0]


@contextmanager
def _mapped(path: Path, error: type[LLMChatError]) -> Iterator[tuple[mmap.mmap, int]]:
    """The file memory-mapped, after the checks every reader needs; OS errors become `error`."""
    if not path.exists():
        raise error(f"no such file: {path}")
    if not path.is_file():
        raise error(f"{path} is not a file")
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if size < 24:
                head = handle.read(4)
                if head != _GGUF_MAGIC[: len(head)] or not head:
                    raise error(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
                raise error(f"{path} is a truncated or corrupt GGUF file: it ends inside the header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                yield data, size
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class RawTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    type_id: int  # ggml type (GGMLQuantizationType's value)
    offset: int  # absolute, in bytes


def read_gguf_index(
    path: str | Path, error: type[LLMChatError] = TokenizerError
) -> tuple[dict[str, Any], list[RawTensorInfo]]:
    """Metadata (as read_gguf_metadata) and the tensor infos, from the header only."""
    path = Path(path).expanduser()
    with _mapped(path, error) as (data, size):
        metadata, cursor = _read_header(data, path, error)
        raw = []
        for _ in range(metadata["GGUF.tensor_count"]):
            name = cursor.string()
            dims = tuple(cursor.scalar("Q") for _ in range(cursor.scalar("I")))
            raw.append((name, dims, cursor.scalar("I"), cursor.scalar("Q")))
        alignment = int(metadata.get("general.alignment") or DEFAULT_ALIGNMENT)
        data_start = -(-cursor.pos // alignment) * alignment
    return metadata, [RawTensorInfo(name, dims, kind, data_start + offset) for name, dims, kind, offset in raw]


def _read_header(data: mmap.mmap, path: Path, error: type[LLMChatError]) -> tuple[dict[str, Any], _Cursor]:
    if data[:4] != _GGUF_MAGIC:
        raise error(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    endian = "<"
    version = struct.unpack("<I", data[4:8])[0]
    if version not in (2, 3):
        endian, version = ">", struct.unpack(">I", data[4:8])[0]
        if version not in (2, 3):
            raise error(f"{path}: GGUF version {struct.unpack('<I', data[4:8])[0]} is not supported (only 2 and 3)")
    cursor = _Cursor(data, endian, path, error)
    cursor.pos = 8
    tensor_count, kv_count = cursor.scalar("Q"), cursor.scalar("Q")
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("I"))
    return metadata, cursor
