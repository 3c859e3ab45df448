"""Tokenizer and StreamDecoder against real tokenizers built here (no downloads).

Two families matter for chat models and detokenize differently: byte-level BPE (GPT-2, Llama-3,
Qwen: every piece is bytes, a character can span tokens) and SentencePiece-style BPE with byte
fallback (Llama-2, Mistral: `▁` marks spaces, the decoder strips the text's first space, and
unknown characters become runs of `<0x..>` tokens). `transformers` is the reference.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llmchat.engine.errors import TokenizerError
from llmchat.engine.tokenizer import StreamDecoder, Tokenizer

FFFD = "\ufffd"

TEXTS = [
    "Hello world! How are you today?",
    " one leading space",
    "  two leading spaces, then text",
    "你好，世界！这是一个测试。",
    "Emoji time 😀🎉👍🏽 and 👨‍👩‍👧 family 🚀",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "mixed 中文 and English 日本語テキスト 한국어 ✓ ∑ ≠ done",
    "tabs\tand\nnewlines\n\n  indented",
    "ends with emoji 🔥",
    "",
]

BYTE_LEVEL_CORPUS = [
    "Hello world! This is a small corpus for a byte-level tokenizer.",
    "你好，世界！我们在测试中文分词。这是一个测试。",
    "Emoji are fun 😀🎉🔥🚀 and so are words.",
    "def add(a, b):\n    return a + b  # code too\n",
    "The quick brown fox jumps over the lazy dog. 中文 English mixed.",
] * 30

SENTENCEPIECE_CORPUS = [
    "Hello world! This is a small corpus for a sentencepiece-like tokenizer.",
    "你好 means hello, and 你好 is all the Chinese this vocabulary knows.",
    "def add(a, b):\n    return a + b  # code too\n",
    "The quick brown fox jumps over the lazy dog.",
] * 30


def _write(folder: Path, backend: Backend, config: dict) -> Path:
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _byte_level_backend() -> Backend:
    """Llama-3 style: byte-level BPE whose post-processor adds the BOS."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(BYTE_LEVEL_CORPUS, trainer)
    bos_id = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
    )
    return backend


def _sentencepiece_backend() -> Backend:
    """Llama-2 style: BPE with byte fallback, `▁` spaces, first-space stripping, `<s>` prepended.

    The 256 `<0x..>` pieces sit in the model vocabulary right after the specials, as in Llama-2.
    """
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained = Backend(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizer
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    trained.train_from_iterator(SENTENCEPIECE_CORPUS, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


@pytest.fixture(scope="module")
def byte_level_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": False,
    }
    return _write(tmp_path_factory.mktemp("bl") / "model", _byte_level_backend(), config)


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "normalized": False, "special": True},
        "eos_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    return _write(tmp_path_factory.mktemp("sp") / "model", _sentencepiece_backend(), config)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_folder")


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def reference(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# --- the fixtures really exercise what they claim -------------------------------------------


def test_fixtures_split_characters_across_tokens(tok: Tokenizer) -> None:
    """Without partial-character tokens the streaming tests would prove nothing."""
    ids = tok.encode("你好，世界！😀 世界")
    assert any(FFFD in tok.decode([i]) for i in ids)


def test_sentencepiece_fixture_falls_back_to_bytes(sentencepiece_folder: Path) -> None:
    tok = Tokenizer.from_folder(sentencepiece_folder)
    pieces = tok.token_texts(tok.encode("世界 😀"))
    assert "<0xE4>" in pieces and "<0xF0>" in pieces
    assert "▁你好" in tok.token_texts(tok.encode(" 你好"))


# --- encode / decode against the references --------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, reference, folder: Path, text: str) -> None:
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    plain = tok.encode(text)
    assert plain == backend.encode(text, add_special_tokens=False).ids
    assert plain == reference(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, add_special_tokens=True) == reference(text)["input_ids"]
    with_specials = [tok.bos_token_id, *plain, tok.eos_token_id]
    for skip in (False, True):
        expected = reference.decode(with_specials, skip_special_tokens=skip)
        assert tok.decode(with_specials, skip_special_tokens=skip) == expected
        assert tok.decode(with_specials, skip_special_tokens=skip) == backend.decode(
            with_specials, skip_special_tokens=skip
        )
    if not text.startswith(" "):  # a SentencePiece decoder strips the first space of a text
        assert tok.decode(plain) == text


def test_add_special_tokens_adds_one_bos(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world", add_special_tokens=True)
    assert ids[0] == tok.bos_token_id and ids[1:] == tok.encode("Hello world")
    assert tok.bos_token_id not in tok.encode("Hello world")


def test_no_double_bos(tok: Tokenizer, reference) -> None:
    text = f"{tok.bos_token}Hello world"
    ids = tok.encode(text, add_special_tokens=True)
    assert ids[:2].count(tok.bos_token_id) == 1
    assert ids == tok.encode(text)
    assert reference(text)["input_ids"] == [tok.bos_token_id, *ids]  # transformers would double it


@pytest.mark.parametrize(("add_bos", "add_eos"), [(False, None), (None, True), (True, True), (False, False)])
def test_config_flags_replace_post_processor(
    tmp_path: Path, sentencepiece_folder: Path, add_bos: bool | None, add_eos: bool | None
) -> None:
    """add_bos_token/add_eos_token in tokenizer_config.json win over the tokenizer.json post-processor.

    transformers 5 ignores these flags in from_pretrained when a tokenizer.json exists, but honours
    them as constructor arguments, so that is the reference here.
    """
    transformers = pytest.importorskip("transformers")
    tokenizer_file = sentencepiece_folder / "tokenizer.json"
    flags = {k: v for k, v in (("add_bos_token", add_bos), ("add_eos_token", add_eos)) if v is not None}
    config = {"bos_token": "<s>", "eos_token": "</s>", **flags}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_folder(folder)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **config)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == reference(text)["input_ids"]
        assert ids == [1] * bool(add_bos) + tok.encode(text) + [2] * bool(add_eos)


def test_properties(sentencepiece_folder: Path) -> None:
    tok = Tokenizer.from_folder(sentencepiece_folder)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.vocab_size == Backend.from_file(str(sentencepiece_folder / "tokenizer.json")).get_vocab_size()
    assert tok.special_ids() == {0, 1, 2}
    assert tok.token_id("<0xE4>") == 3 + 0xE4
    assert tok.token_id("no such token") is None
    assert tok.token_texts([1, 3 + 0x41, tok.vocab_size + 10]) == ["<s>", "<0x41>", ""]


def test_special_tokens_map_fills_in_bos_eos(tmp_path: Path, byte_level_folder: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((byte_level_folder / "tokenizer.json").read_bytes())
    special_map = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    tok = Tokenizer.from_folder(folder)
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert tok.eos_token_id == tok.token_id("<|eot_id|>") is not None
    assert tok.special_ids() >= {tok.bos_token_id, tok.eos_token_id}


# --- token_text -------------------------------------------------------------------------------


def test_token_text_shows_partial_bytes(tok: Tokenizer) -> None:
    for token_id in tok.encode("你好，世界！😀 mixed 中文 and words"):
        text = tok.token_text(token_id)
        assert FFFD not in text
        if FFFD not in tok.decode([token_id]):
            assert text == tok.decode([token_id])
        else:
            assert "<0x" in text


def test_token_text_byte_level_piece(byte_level_folder: Path) -> None:
    tok = Tokenizer.from_folder(byte_level_folder)
    assert tok.token_text(tok.token_id("ä")) == "<0xE4>"  # GPT-2 spells byte 0xE4 as "ä"
    assert tok.token_text(tok.token_id("Hello")) == "Hello"


def test_token_text_byte_fallback_piece(sentencepiece_folder: Path) -> None:
    tok = Tokenizer.from_folder(sentencepiece_folder)
    assert tok.token_text(tok.token_id("<0xE4>")) == "<0xE4>"
    assert tok.token_text(tok.token_id("<0x41>")) == "A"


# --- StreamDecoder ----------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
def test_stream_matches_decode_on_texts(tok: Tokenizer, skip: bool) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True) + [tok.eos_token_id] + tok.encode(text)
        pieces = _stream(tok, ids, skip_special_tokens=skip)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full
        assert FFFD not in full and not any(FFFD in piece for piece in pieces)


def test_stream_emits_as_it_goes(tok: Tokenizer) -> None:
    """Text is not all held back until flush: only an unfinished character waits."""
    ids = tok.encode("Hello world! 你好，世界！ Emoji 😀 done.")
    pieces = _stream(tok, ids)
    assert pieces[-1] == ""
    assert sum(1 for piece in pieces if piece) > len(ids) // 3


@pytest.mark.parametrize("skip", [False, True])
def test_stream_matches_decode_on_random_ids(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234)
    byte_ids = [i for i in range(tok.vocab_size) if FFFD in tok.decode([i])]
    assert byte_ids
    for _ in range(600):
        pool = byte_ids if rng.random() < 0.5 else range(tok.vocab_size)
        pick = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(tok.vocab_size) for _ in range(30)]
        ids = pick[: rng.randint(0, 30)]
        pieces = _stream(tok, ids, skip_special_tokens=skip)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full, ids
        position = 0
        for piece in pieces:  # every piece is the text at its place in the final decode
            assert full[position : position + len(piece)] == piece, ids
            position += len(piece)


def test_stream_does_not_commit_an_open_byte_fallback_run(sentencepiece_folder: Path) -> None:
    """`中` followed by an invalid byte decodes as four U+FFFDs, so `中` must not be shown early."""
    tok = Tokenizer.from_folder(sentencepiece_folder)
    ids = [tok.token_id(f"<0x{b:02X}>") for b in (0xE4, 0xB8, 0xAD, 0xFF)] + tok.encode(" a")
    assert tok.decode(ids) == FFFD * 4 + " a"
    assert "".join(_stream(tok, ids)) == FFFD * 4 + " a"


def test_stream_keeps_sentencepiece_spaces(sentencepiece_folder: Path) -> None:
    tok = Tokenizer.from_folder(sentencepiece_folder)
    ids = tok.encode("Hello world and more words")
    pieces = _stream(tok, ids)
    assert "".join(pieces) == "Hello world and more words"
    assert any(piece.startswith(" ") for piece in pieces)


@pytest.mark.parametrize("skip", [False, True])
def test_stream_with_prompt_prefix(tok: Tokenizer, skip: bool) -> None:
    """After a prompt the answer's first space is kept: it is not the start of the text."""
    rng = random.Random(99)
    prompt = tok.encode("System prompt. 你好 User: say hi.", add_special_tokens=True)
    answers = [tok.encode(text) for text in TEXTS]
    answers += [[rng.randrange(tok.vocab_size) for _ in range(20)] for _ in range(200)]
    for answer in answers:
        before = tok.decode(prompt, skip_special_tokens=skip)
        full = tok.decode(prompt + answer, skip_special_tokens=skip)
        assert full.startswith(before)
        pieces = _stream(tok, answer, prefix_ids=prompt, skip_special_tokens=skip)
        assert "".join(pieces) == full[len(before) :]
    pieces = _stream(tok, tok.encode(" Sure"), prefix_ids=prompt)
    assert "".join(pieces) == " Sure"


def test_stream_cost_per_token_is_bounded(folder: Path) -> None:
    """Each push decodes a short window, not the whole answer."""

    class CountingTokenizer(Tokenizer):
        decoded = 0

        def decode(self, ids, *, skip_special_tokens=False) -> str:
            self.decoded += len(ids)
            return super().decode(ids, skip_special_tokens=skip_special_tokens)

    tok = CountingTokenizer.from_folder(folder)
    ids = tok.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 2000
    pieces = _stream(tok, ids)
    assert "".join(pieces) == Tokenizer.from_folder(folder).decode(ids)
    assert tok.decoded < 20 * len(ids)


def test_flush_twice_is_empty(tok: Tokenizer) -> None:
    decoder = StreamDecoder(tok)
    for i in tok.encode("世界😀"):
        decoder.push(i)
    decoder.flush()
    assert decoder.flush() == ""


# --- errors -------------------------------------------------------------------------------------


def _assert_one_line_error(folder: Path, name: str) -> None:
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_folder(folder)
    message = str(info.value)
    assert name in message and "\n" not in message


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    _assert_one_line_error(tmp_path, "tokenizer.json")


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": ', "{}", "[1, 2]", "\xff\xfe"])
def test_corrupt_tokenizer_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="latin-1")
    _assert_one_line_error(tmp_path, "tokenizer.json")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer_config.json", "{not json"),
        ("tokenizer_config.json", "[]"),
        ("tokenizer_config.json", '{"bos_token": 5}'),
        ("tokenizer_config.json", '{"add_bos_token": "yes"}'),
        ("special_tokens_map.json", '{"eos_token": ['),
    ],
)
def test_corrupt_config_files(tmp_path: Path, byte_level_folder: Path, name: str, content: str) -> None:
    (tmp_path / "tokenizer.json").write_bytes((byte_level_folder / "tokenizer.json").read_bytes())
    (tmp_path / name).write_text(content, encoding="utf-8")
    _assert_one_line_error(tmp_path, name)
