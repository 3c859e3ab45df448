"""The one atomic-write helper (llmchat/engine/files.py) that conversations, the registry, settings,
pulled model files and the packed-model cache all go through."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llmchat.engine.files import replacing, write_text_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_the_new_content_replaces_the_file_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "file.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), replacing(target) as temp:
        temp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and not _leftovers(tmp_path)
    with replacing(target) as temp:
        temp.write_text("new")
        assert target.read_text() == "old"  # nothing changes before the block ends
    assert target.read_text() == "new" and not _leftovers(tmp_path)


def test_private_files_are_for_their_owner_and_others_follow_the_umask(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    private, public = tmp_path / "conversation.json", tmp_path / "models.toml"
    write_text_atomic(private, "mine\n", private=True)
    write_text_atomic(public, "shared\n")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(public.stat().st_mode) == 0o666 & ~umask
    assert private.read_text() == "mine\n" and public.read_text() == "shared\n"


def test_a_writer_that_takes_a_path_can_fill_the_temporary_file(tmp_path: Path) -> None:
    """safetensors' save_file writes to a path of its own; durable=False skips the fsyncs (a cache)."""
    target = tmp_path / "cache.bin"
    with replacing(target, durable=False) as temp:
        Path(str(temp)).write_bytes(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and not _leftovers(tmp_path)
