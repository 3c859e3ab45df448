"""Where llmchat keeps its files: the platform's user config, data and cache folders.

Each can be moved with an environment variable (`LLMCHAT_CONFIG_DIR`, `LLMCHAT_DATA_DIR`,
`LLMCHAT_CACHE_DIR`), which is how tests keep away from the real home folder. A folder is created
the first time it is asked for, so callers can write into it straight away.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import platformdirs

from llmchat.engine.errors import LLMChatError

APP_NAME = "llmchat"


def _folder(env_var: str, platform_default: Callable[..., str]) -> Path:
    override = os.environ.get(env_var)
    folder = Path(override).expanduser().absolute() if override else Path(platform_default(APP_NAME, appauthor=False))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LLMChatError(f"cannot create {folder}: {exc.strerror or exc}") from None
    return folder


def config_dir() -> Path:
    """User settings: models.toml, settings, themes."""
    return _folder("LLMCHAT_CONFIG_DIR", platformdirs.user_config_dir)


def data_dir() -> Path:
    """What the user made or chose to keep: conversations, models pulled from Hugging Face."""
    return _folder("LLMCHAT_DATA_DIR", platformdirs.user_data_dir)


def cache_dir() -> Path:
    """What can be fetched again: the demo model."""
    return _folder("LLMCHAT_CACHE_DIR", platformdirs.user_cache_dir)
