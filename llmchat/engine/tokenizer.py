"""Tokenizer for a Hugging Face model folder, and a streaming detokenizer.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust backend `transformers` itself uses) so that
encode/decode give exactly what `transformers` gives, without importing `transformers`.
`StreamDecoder` turns generated ids into text pieces as they arrive, never showing half a
character, with the pieces adding up to exactly what a one-shot decode of all ids returns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from llmchat.engine.errors import TokenizerError
from llmchat.engine.jsonfile import read_json_object

_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Prompt ids a StreamDecoder keeps as left context (vLLM keeps 5 as well): enough for decoders
# that strip the first space of a text to see that the answer does not start the text.
_CONTEXT_IDS = 5


def _gpt2_char_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE pieces spell each byte as one char."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_GPT2_CHAR_TO_BYTE = _gpt2_char_to_byte()


def _show_bytes(data: bytes) -> str:
    """Decode UTF-8, writing each byte that is not part of a whole character as `<0xE4>`."""
    out: list[str] = []
    while True:
        try:
            out.append(data.decode("utf-8"))
            return "".join(out)
        except UnicodeDecodeError as err:
            out.append(data[: err.start].decode("utf-8"))
            out.extend(f"<0x{b:02X}>" for b in data[err.start : err.end])
            data = data[err.end :]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _token_string(value: Any, key: str, path: Path) -> str | None:
    """bos_token/eos_token are written either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f"cannot read {path}: {key} must be a string or an object with 'content'")


def _flag(config: dict[str, Any], key: str, path: Path) -> bool | None:
    value = config.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise TokenizerError(f"cannot read {path}: {key} must be true or false")


class Tokenizer:
    """Text ↔ ids for one model, matching `transformers`' fast tokenizer for the same folder."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ) -> None:
        # A tokenizer.json may keep truncation/padding from training; a prompt must never be cut
        # or padded. `transformers` turns them off per call the same way.
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self.token_id(bos_token) if bos_token is not None else None
        self.eos_token_id = self.token_id(eos_token) if eos_token is not None else None
        # Like transformers 5: explicit add_bos_token/add_eos_token flags replace the
        # tokenizer.json post-processor (a missing one of the two counts as false); with neither
        # flag the post-processor decides.
        self._explicit_flags = add_bos_token is not None or add_eos_token is not None
        self._add_bos = bool(add_bos_token) and self.bos_token_id is not None
        self._add_eos = bool(add_eos_token) and self.eos_token_id is not None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # SentencePiece byte-fallback pieces <0x00>..<0xFF>; their decoded text depends on their
        # neighbours, which StreamDecoder and token_text need to know.
        byte_ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self._byte_ids: frozenset[int] = frozenset(i for i in byte_ids if i is not None)
        # What decode(skip_special_tokens=True) drops: the backend's added tokens marked special.
        added = backend.get_added_tokens_decoder().items()
        self._skippable_ids: frozenset[int] = frozenset(i for i, token in added if token.special)

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """Load tokenizer.json plus the special-token settings of tokenizer_config.json.

        special_tokens_map.json (older exports) only fills in a bos/eos the config lacks.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path} not found: the model folder needs a tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for any parse error
            raise TokenizerError(f"cannot read {path}: {_one_line(err)}") from None
        config_path = folder / "tokenizer_config.json"
        map_path = folder / "special_tokens_map.json"
        config = read_json_object(config_path, TokenizerError) or {}
        special_map = read_json_object(map_path, TokenizerError) or {}
        tokens: dict[str, str | None] = {}
        for key in ("bos_token", "eos_token"):
            value = _token_string(config.get(key), key, config_path)
            tokens[key] = value if value is not None else _token_string(special_map.get(key), key, map_path)
        return cls(
            backend,
            bos_token=tokens["bos_token"],
            eos_token=tokens["eos_token"],
            add_bos_token=_flag(config, "add_bos_token", config_path),
            add_eos_token=_flag(config, "add_eos_token", config_path),
        )

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Text → ids; special-token strings in the text become their ids.

        add_special_tokens=False is for an already rendered chat (it carries its own BOS if the
        template writes one); True is what `transformers`' tokenizer(text) gives, except that a
        text starting with the BOS token does not get a second one.
        """
        if not add_special_tokens:
            return self._backend.encode(text, add_special_tokens=False).ids
        if self._explicit_flags:
            ids = self._backend.encode(text, add_special_tokens=False).ids
            if self._add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self._add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        else:
            ids = self._backend.encode(text, add_special_tokens=True).ids
        bos = self.bos_token_id
        if bos is not None and ids[:2] == [bos, bos] and text.startswith(self.bos_token or ""):
            del ids[0]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Ids → text, exactly as the backend (and so `transformers`) renders them."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Readable text of one token for UI chips.

        A token holding part of a multi-byte character decodes to U+FFFD on its own; show its
        bytes instead (`<0xE4>`), which tells the user what the token really is.
        """
        text = self.decode([token_id])
        if _REPLACEMENT not in text:
            return text
        piece = self._backend.id_to_token(token_id) or ""
        if token_id in self._byte_ids:
            return piece
        if piece and all(c in _GPT2_CHAR_TO_BYTE for c in piece):
            return _show_bytes(bytes(_GPT2_CHAR_TO_BYTE[c] for c in piece))
        return text

    def token_texts(self, ids: Iterable[int]) -> list[str]:
        """Raw vocabulary pieces (`Ġhello`, `▁hello`, `<0xE4>`); "" for an id outside the vocab."""
        return [self._backend.id_to_token(i) or "" for i in ids]

    def special_ids(self) -> set[int]:
        """Ids of the special added tokens (those decode(skip_special_tokens=True) drops), BOS and EOS."""
        ids = set(self._skippable_ids)
        ids.update(i for i in (self.bos_token_id, self.eos_token_id) if i is not None)
        return ids

    def token_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)


class StreamDecoder:
    """Turns a stream of ids into text pieces; never emits half a multi-byte character;
    concatenation of all pieces (plus flush()) == tokenizer.decode(all_ids) exactly.

    Decoding the whole answer at every token would cost O(n) per token, so only a short window
    is decoded (the prefix-offset/read-offset technique of text-generation-inference and vLLM):
    the window starts with ids whose text was already emitted, kept as context because a
    SentencePiece decoder strips the leading space of whatever text it decodes first, and the
    new piece is the window's text past that context's text. The window moves on only where
    later ids can no longer change earlier text: not while the text ends in U+FFFD (a byte-level
    token left a UTF-8 sequence unfinished), and not inside a run of byte-fallback tokens
    `<0x..>`, because ByteFallback turns a whole run into U+FFFDs as soon as it holds one invalid
    byte, so even a finished character may change until the run ends.

    With prefix_ids (the prompt, which should end on a character boundary, as a rendered prompt
    does) the pieces are the text the new ids add after it: decode(prefix + ids) minus
    decode(prefix), so an answer's first space survives.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, prefix_ids: Sequence[int] = (), skip_special_tokens: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prefix_ids)[-_CONTEXT_IDS:]
        self._read = len(self._ids)  # ids before this index are context: their text is already out
        self._in_byte_run = False
        for token_id in self._ids:
            self._track_byte_run(token_id)
        self._context_text = self._decode()

    def _track_byte_run(self, token_id: int) -> None:
        """A run of byte-fallback tokens ends at the next token the decoder sees; a special token
        that decode skips is invisible to it and so leaves the run open."""
        if self._skip and token_id in self._tokenizer._skippable_ids:
            return
        self._in_byte_run = token_id in self._tokenizer._byte_ids

    def _decode(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be "")."""
        self._ids.append(token_id)
        self._track_byte_run(token_id)
        if self._in_byte_run:
            return ""
        text = self._decode()
        if len(text) <= len(self._context_text) or text.endswith(_REPLACEMENT):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Whatever is left at the end, as decode renders it (e.g. U+FFFD for unfinished bytes)."""
        return self._emit(self._decode())

    def _emit(self, text: str) -> str:
        """Return the window's text past the context and make the new ids the next context.

        The context must have non-empty text (else the next window's decode would strip a space
        it should keep), so an empty piece leaves the window as it is.
        """
        piece = text[len(self._context_text) :]
        if piece:
            del self._ids[: self._read]
            self._read = len(self._ids)
            self._context_text = self._decode()
        return piece
