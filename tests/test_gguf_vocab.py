"""Tokenizers built from GGUF vocabularies must tokenize exactly like llama.cpp.

Ground truth, never our own output:
- llama.cpp's tokenizer test vectors (`../shared/conformance/tokenizers/ggml-vocab-*.gguf` with
  their `.inp`/`.out` files), checked in-process for every string and through the real CLI;
- llama.cpp's word splits for every pre-tokenizer it knows (tests/data/llama_cpp_pre_splits.json,
  recorded from llama.cpp's `unicode_regex_split` with the regex lists of src/llama-vocab.cpp);
- gguf-py's GGUFReader for the metadata reader;
- llama.cpp's documented rules (add BOS for SentencePiece, special tokens never split, ...).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import pytest

from llmchat.engine.errors import TokenizerError
from llmchat.engine.gguf_metadata import read_gguf_metadata
from llmchat.engine.gguf_pretokenizers import PRE_TOKENIZERS
from llmchat.engine.gguf_vocab import end_of_generation_ids, special_token_ids, tokenizer_from_gguf
from llmchat.engine.package import open_tokenizer
from llmchat.engine.tokenizer import StreamDecoder, Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
VECTORS = SHARED / "conformance" / "tokenizers"
SEPARATOR = "\n__ggml_vocab_test__\n"
NO_SHARED = f"llama.cpp's tokenizer vectors are not there: {VECTORS} (../shared is absent)"
VOCAB_NAMES = sorted(p.name for p in VECTORS.glob("ggml-vocab-*.gguf")) if VECTORS.is_dir() else []
VOCABS = VOCAB_NAMES or [pytest.param("none", marks=pytest.mark.skip(reason=NO_SHARED))]
PRE_SPLITS = json.loads((Path(__file__).parent / "data" / "llama_cpp_pre_splits.json").read_text(encoding="utf-8"))
SPACE = "\u2581"


@functools.cache
def cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, llama.cpp's ids) for every string of one conformance vocab."""
    path = VECTORS / name
    texts = Path(f"{path}.inp").read_bytes().decode("utf-8").split(SEPARATOR)
    assert texts[-1] == "", "the .inp file ends with a separator"
    expected = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    texts = texts[:-1]
    assert len(expected) >= len(texts) and not any(expected[len(texts) :]), "one .out line per string"
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, expected)]


@functools.cache
def vectors(name: str) -> tuple[dict[str, Any], Tokenizer, list[tuple[str, list[int]]]]:
    """metadata, tokenizer and test cases of one conformance vocab, built once."""
    metadata = read_gguf_metadata(VECTORS / name)
    return metadata, tokenizer_from_gguf(metadata, str(VECTORS / name)), cases(name)


def longest_case(name: str) -> tuple[str, list[int]]:
    """The longest vector mixes every hard case: spaces, tabs, newlines, emoji, CJK, digits, quotes."""
    return max(cases(name), key=lambda case: len(case[0]))


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """`llmchat tokenize VOCAB --json --file INPUT` for every vocab, all started at once: each
    costs seconds (Python, torch imported by the CLI, the vocabulary), so they overlap."""
    root = tmp_path_factory.mktemp("cli-tokenize")
    env = dict(os.environ)
    for kind in ("config", "data", "cache"):  # never the user's real dirs
        env[f"LLMCHAT_{kind.upper()}_DIR"] = str(root / kind)
    runs = {}
    for name in VOCAB_NAMES:
        source = root / f"{name}.txt"
        source.write_bytes(longest_case(name)[0].encode("utf-8"))
        command = [sys.executable, "-m", "llmchat", "tokenize", str(VECTORS / name), "--json", "--file", str(source)]
        runs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield runs
    for run in runs.values():  # a run whose test was deselected or failed early
        if run.poll() is None:
            run.kill()
        run.communicate()


def token_id(metadata: dict[str, Any], text: str) -> int:
    return int(metadata["tokenizer.ggml.tokens"].index(text))


# ---------------------------------------------------------------------------------------------
# llama.cpp's test vectors


@pytest.mark.parametrize("name", VOCABS)
def test_every_vector_tokenizes_like_llama_cpp(name: str) -> None:
    _, tokenizer, cases = vectors(name)
    assert len(cases) > 30
    wrong = [(text, ids, got) for text, ids in cases if (got := tokenizer.encode(text)) != ids]
    report = "\n".join(f"{text!r}\n  llama.cpp {ids}\n  llmchat   {got}" for text, ids, got in wrong[:3])
    assert not wrong, f"{len(wrong)}/{len(cases)} strings differ from llama.cpp, first ones:\n{report}"


@pytest.mark.parametrize("name", VOCABS)
def test_cli_tokenizes_a_file_like_llama_cpp(name: str, cli_runs: dict[str, subprocess.Popen[str]]) -> None:
    """Through the real CLI, the longest vector read from a file as exact bytes (CR LF, tabs...)."""
    text, ids = longest_case(name)
    assert "\n \n" in text and "\t" in text, "the long vector keeps its whitespace"
    stdout, stderr = cli_runs[name].communicate(timeout=300)
    assert cli_runs[name].returncode == 0, stderr
    output = json.loads(stdout)
    assert output["ids"] == ids
    assert len(output["tokens"]) == len(ids)


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpps_ids_decode_to_the_text(name: str) -> None:
    """Round trip: llama.cpp's own ids (and ours, equal) give the text back, as llama.cpp's
    detokenizer does for these strings (the SentencePiece dummy-prefix space is dropped again)."""
    _, tokenizer, cases = vectors(name)
    wrong = [(text, tokenizer.decode(ids)) for text, ids in cases if tokenizer.decode(ids) != text]
    assert not wrong, f"{len(wrong)} strings do not come back, first: {wrong[:2]}"
    assert all(tokenizer.decode(tokenizer.encode(text)) == text for text, _ in cases)


@pytest.mark.parametrize("name", VOCABS)
def test_streaming_decode_adds_up_to_the_text(name: str) -> None:
    _, tokenizer, cases = vectors(name)
    for text, ids in cases:
        decoder = StreamDecoder(tokenizer)
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces), f"half a character was shown for {text!r}"


@pytest.mark.skipif(not VOCAB_NAMES, reason=NO_SHARED)
def test_byte_tokens_show_their_byte() -> None:
    metadata, tokenizer, _ = vectors("ggml-vocab-llama-spm.gguf")
    llama = tokenizer.encode("🦙")  # no token for the llama emoji: four <0x..> byte tokens
    assert llama[-4:] == [token_id(metadata, f"<0x{b:02X}>") for b in "🦙".encode()]
    assert [tokenizer.token_text(i) for i in llama[-4:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


# ---------------------------------------------------------------------------------------------
# special tokens and BOS/EOS


@pytest.mark.skipif(not VOCAB_NAMES, reason=NO_SHARED)
def test_control_tokens_are_never_split() -> None:
    metadata, tokenizer, _ = vectors("ggml-vocab-qwen2.gguf")
    start, end = token_id(metadata, "<|im_start|>"), token_id(metadata, "<|im_end|>")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    assert ids[1:-1] == tokenizer.encode("user\nhi")
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert {start, end} <= tokenizer.special_ids()


@pytest.mark.skipif(not VOCAB_NAMES, reason=NO_SHARED)
def test_end_of_generation_tokens() -> None:
    """llama.cpp ends a turn at EOS and at the end-of-turn tokens it knows by their text."""
    metadata, tokenizer, _ = vectors("ggml-vocab-qwen2.gguf")
    eog = end_of_generation_ids(metadata, "qwen2")
    assert {token_id(metadata, "<|im_end|>"), token_id(metadata, "<|endoftext|>")} <= set(eog)
    assert metadata["tokenizer.ggml.eos_token_id"] in eog
    assert tokenizer.eos_token_id == metadata["tokenizer.ggml.eos_token_id"]
    ids = special_token_ids(metadata, "qwen2")
    assert ids["eot"] == token_id(metadata, "<|im_end|>")  # the first of llama.cpp's list it has
    llama3, _, _ = vectors("ggml-vocab-llama-bpe.gguf")  # EOS is <|end_of_text|>, a turn ends at <|eot_id|>
    assert {token_id(llama3, "<|eot_id|>"), llama3["tokenizer.ggml.eos_token_id"]} <= set(
        end_of_generation_ids(llama3, "llama3")
    )
    assert special_token_ids(llama3, "llama3")["eot"] == token_id(llama3, "<|eot_id|>")


@pytest.mark.skipif(not VOCAB_NAMES, reason=NO_SHARED)
def test_bos_is_added_where_llama_cpp_adds_it() -> None:
    # SentencePiece adds BOS by default (and the file says so); GPT-2 does not; llama3's pre-tokenizer does.
    for name, bos in (("ggml-vocab-llama-spm.gguf", True), ("ggml-vocab-gpt-2.gguf", False)):
        metadata, tokenizer, _ = vectors(name)
        plain = tokenizer.encode("Hello world")
        expected = [metadata["tokenizer.ggml.bos_token_id"], *plain] if bos else plain
        assert tokenizer.encode("Hello world", add_special_tokens=True) == expected, name
    metadata, tokenizer, _ = vectors("ggml-vocab-llama-bpe.gguf")
    assert "tokenizer.ggml.add_bos_token" not in metadata
    bos = metadata["tokenizer.ggml.bos_token_id"]
    assert tokenizer.encode("Hi", add_special_tokens=True) == [bos, *tokenizer.encode("Hi")] != tokenizer.encode("Hi")


@pytest.mark.skipif(not VOCAB_NAMES, reason=NO_SHARED)
def test_phi3_special_tokens_eat_the_whitespace_after_them() -> None:
    """llama.cpp sets rstrip on Phi-3's special tokens, except <s>, <unk> and <|endoftext|>."""
    metadata, tokenizer, _ = vectors("ggml-vocab-phi-3.gguf")
    user = token_id(metadata, "<|user|>")
    assert tokenizer.encode("<|user|>\n  hi") == tokenizer.encode("<|user|>hi")
    assert tokenizer.encode("<|user|>hi")[0] == user
    assert tokenizer.encode("<s>\nhi") != tokenizer.encode("<s>hi")


# ---------------------------------------------------------------------------------------------
# every pre-tokenizer llama.cpp knows, on a small byte-level vocabulary


def gpt2_byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode (as published with GPT-2): the character that spells each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in printable):
        chars[b] = chr(256 + extra)
    return [chars[b] for b in range(256)]


SPECIAL_TOKENS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool>", 4)]


def byte_level_metadata(pre: str, merges: tuple[str, ...] = ("Ġ t", "h e", "Ġt he", "l l", "H e", "He ll")) -> dict:
    tokens = gpt2_byte_chars()
    tokens += ["".join(m.split(" ")) for m in merges if "".join(m.split(" ")) not in tokens]
    types = [1] * len(tokens) + [t for _, t in SPECIAL_TOKENS]
    tokens += [text for text, _ in SPECIAL_TOKENS]
    return {
        "general.architecture": "qwen2",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.eos_token_id": tokens.index("<|endoftext|>"),
    }


def raw_utf8_metadata(model: str, pre: str) -> dict:
    """A SentencePiece-style BPE vocabulary: ▁ for spaces, <0xNN> byte tokens (Gemma 4's kind)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), SPACE, "h", "e", "he", "▁he"]
    types = [3, 3, 3, 2, *([6] * 256), 1, 1, 1, 1, 1]
    tokens += [text for text, _ in SPECIAL_TOKENS]
    types += [t for _, t in SPECIAL_TOKENS]
    return {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["h e", "▁ he"],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
    }


def word_splits(tokenizer: Tokenizer, text: str) -> list[str]:
    """The words the pre-tokenizer cuts `text` into, spelled back from GPT-2's byte characters."""
    char_to_byte = {c: b for b, c in enumerate(gpt2_byte_chars())}
    words = [word for word, _ in tokenizer._backend.pre_tokenizer.pre_tokenize_str(text)]
    if all(c in char_to_byte for word in words for c in word):
        return [bytes(char_to_byte[c] for c in word).decode("utf-8") for word in words]
    return words


def test_the_table_knows_exactly_llama_cpps_pre_tokenizers() -> None:
    assert set(PRE_TOKENIZERS) == set(PRE_SPLITS["pre_tokenizers"])


@pytest.mark.parametrize("pre", sorted(PRE_SPLITS["pre_tokenizers"]))
def test_pre_tokenizer_splits_words_like_llama_cpp(pre: str) -> None:
    byte_level = PRE_TOKENIZERS[pre].byte_level
    metadata = byte_level_metadata(pre) if byte_level else raw_utf8_metadata("gpt2", pre)
    tokenizer = tokenizer_from_gguf(metadata, f"test-{pre}.gguf")
    expected = PRE_SPLITS["splits"][PRE_SPLITS["pre_tokenizers"][pre]]
    for text, words in zip(PRE_SPLITS["texts"], expected):
        assert word_splits(tokenizer, text) == words
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    sample = "<|im_start|>The hell<tool>"
    ids = tokenizer.encode(sample)
    assert ids[0] == metadata["tokenizer.ggml.tokens"].index("<|im_start|>")
    assert ids[-1] == metadata["tokenizer.ggml.tokens"].index("<tool>")
    assert tokenizer.decode(ids) == sample


def test_byte_level_merges_apply_in_rank_order() -> None:
    metadata = byte_level_metadata("gpt-2")
    tokenizer = tokenizer_from_gguf(metadata, "test.gguf")
    tokens = metadata["tokenizer.ggml.tokens"]
    assert [tokens[i] for i in tokenizer.encode("Hell the")] == ["Hell", "Ġthe"]


def test_merges_that_are_not_tokens_are_left_out() -> None:
    metadata = byte_level_metadata("gpt-2", merges=("Ġ t", "h e", "Ġt he"))
    metadata["tokenizer.ggml.merges"] = ["x y", "Ġ t", "h e", "Ġt he", "nospace"]  # xy is no token
    tokenizer = tokenizer_from_gguf(metadata, "test.gguf")
    tokens = metadata["tokenizer.ggml.tokens"]
    assert [tokens[i] for i in tokenizer.encode("xy the")] == ["x", "y", "Ġthe"]


def test_gemma4_vocab_is_sentencepiece_style_bpe() -> None:
    metadata = raw_utf8_metadata("gemma4", "")
    tokenizer = tokenizer_from_gguf(metadata, "gemma4.gguf")
    tokens = metadata["tokenizer.ggml.tokens"]
    ids = tokenizer.encode("he he!\n", add_special_tokens=True)
    # llama.cpp forces BOS on for Gemma 4 even when the file says no; unknown characters are bytes.
    assert [tokens[i] for i in ids] == ["<bos>", "he", "▁he", "<0x21>", "<0x0A>"]
    assert tokenizer.decode(ids[1:]) == "he he!\n"


def test_whitespace_tokenizer_drops_whitespace_and_can_lowercase() -> None:
    """llama.cpp's `whitespace` tokenizer (jina-embeddings-v2-base-zh): BPE on the words between
    whitespace, lowercased when tokenizer.ggml.normalizer.lowercase says so."""
    metadata = raw_utf8_metadata("whitespace", "whitespace")
    tokens = metadata["tokenizer.ggml.tokens"]
    assert [tokens[i] for i in tokenizer_from_gguf(metadata, "ws.gguf").encode("he \t he\nH")] == ["he", "he", "<0x48>"]
    metadata["tokenizer.ggml.normalizer.lowercase"] = True
    assert [tokens[i] for i in tokenizer_from_gguf(metadata, "ws.gguf").encode("HE  he")] == ["he", "he"]


# ---------------------------------------------------------------------------------------------
# bad vocabularies


def test_unknown_pre_tokenizer_is_named() -> None:
    with pytest.raises(TokenizerError) as error:
        tokenizer_from_gguf(byte_level_metadata("no-such-pre"), "/models/odd.gguf")
    message = str(error.value)
    assert "/models/odd.gguf" in message and "'no-such-pre'" in message and "\n" not in message


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"tokenizer.ggml.model": "rwkv"}, "tokenizer model 'rwkv' is not supported"),
        ({"tokenizer.ggml.model": "t5"}, "tokenizer model 't5' is not supported"),
        ({"tokenizer.ggml.model": "bert"}, "tokenizer model 'bert' is not supported"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model is missing"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens is missing"),
        ({"tokenizer.ggml.tokens": [1, 2]}, "tokenizer.ggml.tokens must be a list of strings"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges is missing"),
        ({"tokenizer.ggml.token_type": [1]}, "tokenizer.ggml.token_type has 1 entries"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a"], "tokenizer.ggml.token_type": [1, 1, 1]}, "same token twice"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token must be true or false"),
    ],
)
def test_bad_vocabulary_is_one_clear_line(change: dict[str, Any], problem: str) -> None:
    metadata = byte_level_metadata("qwen2")
    for key, value in change.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    with pytest.raises(TokenizerError) as error:
        tokenizer_from_gguf(metadata, "/models/bad.gguf")
    assert str(error.value).startswith("/models/bad.gguf: ")
    assert problem in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# reading GGUF files


def write_gguf(path: Path, metadata: dict[str, Any]) -> Path:
    """A vocab-only GGUF written by gguf-py, as llama.cpp's converter writes them."""
    writer = gguf.GGUFWriter(path, arch=metadata.get("general.architecture", "qwen2"))
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(False)
    writer.add_token_scores([0.5] * len(metadata["tokenizer.ggml.tokens"]))
    writer.add_uint8("test.u8", 200)
    writer.add_int64("test.i64", -5)
    writer.add_float64("test.f64", 0.25)
    writer.add_array("test.floats", [1.5, -2.0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_reader_contents(path: Path) -> dict[str, Any]:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def test_metadata_reader_reads_what_gguf_py_reads(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "vocab.gguf", byte_level_metadata("qwen2"))
    metadata = read_gguf_metadata(path)
    assert metadata == gguf_reader_contents(path)
    assert metadata["test.u8"] == 200 and metadata["test.floats"] == [1.5, -2.0]


@pytest.mark.skipif(not VOCAB_NAMES, reason=NO_SHARED)
def test_metadata_reader_reads_a_real_vocab_like_gguf_py() -> None:
    path = VECTORS / "ggml-vocab-phi-3.gguf"
    assert read_gguf_metadata(path) == gguf_reader_contents(path)


def test_gguf_file_errors_are_one_line(tmp_path: Path) -> None:
    good = write_gguf(tmp_path / "vocab.gguf", byte_level_metadata("qwen2"))
    data = good.read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "tiny.gguf").write_bytes(data[:10])
    (tmp_path / "text.gguf").write_text("not a model\n" * 4)
    cases = {
        tmp_path / "absent.gguf": "no such file",
        tmp_path / "half.gguf": "truncated or corrupt GGUF",
        tmp_path / "tiny.gguf": "truncated or corrupt GGUF",
        tmp_path / "text.gguf": "is not a GGUF file",
    }
    for path, problem in cases.items():
        with pytest.raises(TokenizerError) as error:
            open_tokenizer(path)
        assert str(path) in str(error.value) and problem in str(error.value) and "\n" not in str(error.value)


def test_open_tokenizer_takes_a_gguf_file_or_a_folder(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "vocab.gguf", byte_level_metadata("qwen2"))
    from_file = open_tokenizer(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    from_file._backend.save(str(folder / "tokenizer.json"))
    from_folder = open_tokenizer(folder)
    text = "<|im_start|>The hell 123<|im_end|>"
    direct = tokenizer_from_gguf(read_gguf_metadata(path), str(path))
    assert from_file.encode(text) == from_folder.encode(text) == direct.encode(text)
    assert from_file.encode(text)[0] == byte_level_metadata("qwen2")["tokenizer.ggml.tokens"].index("<|im_start|>")


def test_cli_names_an_unknown_pre_tokenizer(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "odd.gguf", byte_level_metadata("no-such-pre"))
    result = subprocess.run(
        [sys.executable, "-m", "llmchat", "tokenize", str(path), "hello", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmchat: error: ")
    assert str(path) in lines[0] and "'no-such-pre'" in lines[0]
