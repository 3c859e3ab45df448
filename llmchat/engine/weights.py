"""Reading checkpoint tensors safely.

Weights come from safetensors files (a single file, or shards listed in
`model.safetensors.index.json`), memory-mapped and read one tensor at a time, so the model is built
without a second full copy in RAM. Pickle checkpoints are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from llmchat.engine.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files, in shard order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid shard index: {exc}") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder} only has pickle weights ({', '.join(pickles[:3])}); llmchat refuses to load them "
            "because unpickling can run arbitrary code. Convert them to safetensors first."
        )
    raise ModelLoadError(f"{folder} has no weights (*.safetensors)")


class SafetensorsWeights:
    """The tensors of a safetensors checkpoint (one file or shards), read lazily."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def quantized_types(self) -> dict[str, str]:
        return {}  # safetensors folders hold float tensors (GPTQ/AWQ go through QuantizedWeights)

    def tensor_names(self) -> set[str]:
        """Every tensor's name, from the headers only."""
        names: set[str] = set()
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    names.update(handle.keys())
            except Exception as exc:
                raise ModelLoadError(f"{path.name} is corrupt or truncated: {exc}") from None
        return names

    def tensors(self, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for every tensor of the checkpoint but those in `skip`, one at a time.

        Each tensor is copied out of the memory map and the map is closed before the next one:
        a tensor that kept pointing into the map would keep the whole file resident (measured:
        +540 MB of RSS for the demo model), and reading a whole file through one map leaves every
        page of it counted against the process until the end of the load.
        """
        for path in self.files:
            for name in self._names_in(path):
                if name in skip:
                    continue
                try:
                    with safe_open(str(path), framework="pt", device="cpu") as handle:
                        tensor = handle.get_tensor(name).clone()
                except Exception as exc:  # safetensors raises its own error types for corrupt files
                    raise ModelLoadError(f"{path.name} is corrupt or truncated: {exc}") from None
                yield name, tensor

    @staticmethod
    def _names_in(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except Exception as exc:
            raise ModelLoadError(f"{path.name} is corrupt or truncated: {exc}") from None
