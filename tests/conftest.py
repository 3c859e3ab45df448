"""Shared fixtures: tiny random-weight model folders, built once per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_model

TinyModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """`tiny_model(kind, config_style="new", sharded=False)` -> model folder, each built once."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple[str, str, bool], Path] = {}

    def get(kind: str, config_style: str = "new", sharded: bool = False) -> Path:
        key = (kind, config_style, sharded)
        if key not in built:
            name = f"{kind}-{config_style}" + ("-sharded" if sharded else "")
            built[key] = build_tiny_model(kind, root / name, config_style=config_style, sharded=sharded)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_gguf(kind, qtype="F32")` -> the tiny folder exported as llama.cpp's converter would
    (tests/gguf_export.py), each (kind, type) written once; `qtype` a GGML type or its name."""
    from gguf import GGMLQuantizationType

    from tests.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("tiny_gguf")
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, qtype: GGMLQuantizationType | str = "F32") -> Path:
        name = qtype if isinstance(qtype, str) else qtype.name
        if (kind, name) not in made:
            stored = GGMLQuantizationType[name]
            made[kind, name] = export_gguf(tiny_model(kind), root / f"{kind}-{name}.gguf", qtype=stored)
        return made[kind, name]

    return get


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matmuls run fastest so, and on a busy 2-core box ten times faster than on two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["llmchat", "pytorch"])
def int4_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs a test with each int4 decode kernel: llmchat's own (q4kernel.c, where it builds) and PyTorch's."""
    from llmchat.engine import q4kernel

    monkeypatch.setenv(q4kernel.ENV_SWITCH, "1" if request.param == "llmchat" else "0")
    q4kernel.available.cache_clear()
    if request.param == "llmchat" and q4kernel.available() is None:
        pytest.skip(f"llmchat's int4 kernel is not available here: {q4kernel.describe()}")
    yield request.param
    monkeypatch.undo()
    q4kernel.available.cache_clear()


@pytest.fixture(autouse=True)
def llmchat_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Fresh config/data/cache dirs for every test (subprocesses inherit them): no test touches the real home."""
    root = tmp_path_factory.mktemp("llmchat-home")
    dirs = {kind: root / kind for kind in ("config", "data", "cache")}
    for kind, folder in dirs.items():
        monkeypatch.setenv(f"LLMCHAT_{kind.upper()}_DIR", str(folder))
    return dirs


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo model's GGUF file (SmolLM2-135M-Instruct Q4_1), fetched once and cached."""
    from tests.demo_model import DemoModelUnavailable, demo_gguf_file

    try:
        return demo_gguf_file()
    except DemoModelUnavailable as error:
        pytest.skip(f"demo GGUF unavailable: {error}")
