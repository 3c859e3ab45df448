"""Writing a file so that a crash leaves the old one or the new one, never half of one.

One helper for every file llmchat replaces (conversations, the model registry and settings, pulled
model files, the packed-model cache): the new content goes to a temporary file beside the target
(same folder, so the same filesystem and an atomic rename), is flushed to disk, and only then
renamed over the target; on any error the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_path_next_to(target: Path) -> Path:
    """A fresh name in `target`'s folder, hidden, that no other writer uses."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextlib.contextmanager
def replacing(target: Path, *, durable: bool = True, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write the new content to; when the block ends without an error it
    replaces `target`. `durable`: the file and the rename are fsynced (a power cut keeps the new
    file). `private`: the file is created readable by its owner only (conversations); otherwise it
    gets the umask's usual permissions. The block may open the path itself or hand it to a writer
    (safetensors' save_file)."""
    temp = temp_path_next_to(target)
    if private:
        os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        yield temp
        if durable:
            _fsync_file(temp)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        fsync_directory(target.parent)


def write_text_atomic(target: Path, text: str, *, private: bool = False) -> None:
    """Replace `target` with `text` (UTF-8, newlines as given), durably (see `replacing`)."""
    with (
        replacing(target, private=private) as temp,
        temp.open("w" if private else "x", encoding="utf-8", newline="") as handle,
    ):
        handle.write(text)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; Windows has no directory handles to fsync)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
