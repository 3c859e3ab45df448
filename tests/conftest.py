"""Shared fixtures: tiny random-weight model folders, built once per test session."""

from __future__ import annotations

from collections.abc import Callable
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
