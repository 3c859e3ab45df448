"""Tokenizers built from a GGUF file's vocabulary, tokenizing the way llama.cpp does.

A GGUF carries its tokenizer as `tokenizer.ggml.*` metadata: the token strings, their types and
scores, BPE merges, the pre-tokenizer's name and the special token ids. This module turns that into
a `tokenizers.Tokenizer` (the Rust library `transformers` uses) wrapped in our `Tokenizer`:
- `llama` (SentencePiece): BPE whose merges come from the scores (a pair may merge when the joined
  text is a token; the higher the score of that token, the earlier), a ▁ for every space and one
  in front of the text (add-dummy-prefix), <0xNN> byte fallback.
- `gpt2` (and Gemma 4's `gemma4`): BPE with the file's merges after llama.cpp's pre-tokenizer
  regexes for `tokenizer.ggml.pre` (see gguf_pretokenizers), in GPT-2's byte-to-unicode spelling.
- Control, unknown and user-defined tokens become added tokens (special for control/unknown), so a
  chat template's `<|im_start|>` is one token and never split, with llama.cpp's rules for which
  tokens count as control and which strip spaces around them.

`encode` parses special-token text (llama.cpp's parse_special=true, what a rendered chat needs), as
`Tokenizer` does for every model; llama.cpp's test vectors hold no such text, so they compare equal.

What the `tokenizers` library cannot express exactly (each differs from llama.cpp only in rare
cases; llama.cpp's test vectors all match, and so did thousands of fuzzed strings against a C++
build of llama.cpp's splitter and a port of its merge loops during development):
- Tie-breaks of the SentencePiece merge order: llama.cpp merges the leftmost of equally scored
  pairs, `tokenizers` the one ranked first. Merges are ranked like transformers' converter does
  (score, then longer left part), which matches wherever the two pairs make different tokens.
- Special tokens inside text: llama.cpp cuts the longest special token out of the whole text
  first, `tokenizers` the leftmost (longest at that point). They differ only when two special
  tokens overlap in the text.
- llama.cpp's `clean_spaces` (dropping the space before `.,!?` when a whole text is detokenized)
  is not applied: decode is the concatenation of the token pieces, as llama.cpp streams them.
- A merge whose parts or result are not tokens is dropped (`tokenizers` rejects it; llama.cpp
  would merge and then fall back to bytes). Gemma 4 keeps a newline run that is a token whole,
  which BPE reproduces only if the merges build it.
- lstrip/rstrip around special tokens strip Unicode whitespace (llama.cpp: ASCII `isspace`).
- Decoding: UNUSED-type tokens decode to their text (llama.cpp: nothing); a SentencePiece
  user-defined or control token containing ▁ decodes it as a space (llama.cpp: verbatim); bytes
  that are not valid UTF-8 become U+FFFD (a Python str cannot hold them).
- llama.cpp's default BOS/EOS for a BPE vocabulary without them is token 11; here there is none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from llmchat.engine.errors import TokenizerError
from llmchat.engine.gguf_pretokenizers import PRE_TOKENIZERS, PreTokenizerType
from llmchat.engine.tokenizer import Tokenizer

SPACE = "\u2581"  # ▁, SentencePiece's visible space

# ---------------------------------------------------------------------------------------------
# the vocabulary as llama.cpp sees it


class _Attr:
    """llama_token_attr bits: what a token is (a token can be CONTROL and UNUSED at once). Plain
    ints, not an IntFlag: the vocabulary has 100k+ tokens and enum arithmetic is slow."""

    UNDEFINED = 0
    UNKNOWN = 1
    UNUSED = 2
    NORMAL = 4
    CONTROL = 8
    USER_DEFINED = 16
    BYTE = 32
    LSTRIP = 128
    RSTRIP = 256


# tokenizer.ggml.token_type values (gguf-py's TokenType) → attributes.
_TYPE_ATTRS = {
    1: _Attr.NORMAL,
    2: _Attr.UNKNOWN,
    3: _Attr.CONTROL,
    4: _Attr.USER_DEFINED,
    5: _Attr.UNUSED,
    6: _Attr.BYTE,
}
_SPECIAL = _Attr.CONTROL | _Attr.UNKNOWN

# llama.cpp recognizes these by their text when the GGUF does not name them (llama_vocab::impl::load).
_EOT_TEXTS = [
    *("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>"),
    *("_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
]
_FIM_TEXTS = {
    "fim_pre": "<|fim_prefix|> <fim-prefix> <fim_prefix> <｜fim▁begin｜> <PRE> ▁<PRE> <|code_prefix|> <|prefix|>",
    "fim_suf": "<|fim_suffix|> <fim-suffix> <fim_suffix> <｜fim▁hole｜> <SUF> ▁<SUF> <|code_suffix|> <|suffix|>",
    "fim_mid": "<|fim_middle|> <fim-middle> <fim_middle> <｜fim▁end｜> <MID> ▁<MID> <|code_middle|> <|middle|>",
    "fim_pad": "<|fim_pad|> <fim-pad> <fim_pad> <PAD> [PAD]",
    "fim_rep": "<|fim_repo|> <|repo_name|> <fim-repo> <REPO> <reponame>",
    "fim_sep": "<|file_sep|>",
}
_EOG_TEXTS = frozenset(
    {
        *("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>"),
        *("<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]"),
        *("<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>"),
        *("<｜end▁of▁sentence｜>", "[e~["),
    }
)
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss
_SPECIAL_ID_KEYS = {
    "bos": ("tokenizer.ggml.bos_token_id",),
    "eos": ("tokenizer.ggml.eos_token_id",),
    "eot": ("tokenizer.ggml.eot_token_id",),
    "eom": ("tokenizer.ggml.eom_token_id",),
    "unk": ("tokenizer.ggml.unknown_token_id",),
    "pad": ("tokenizer.ggml.padding_token_id",),
    "fim_pre": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "fim_suf": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "fim_mid": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
    "fim_pad": ("tokenizer.ggml.fim_pad_token_id",),
    "fim_rep": ("tokenizer.ggml.fim_rep_token_id",),
    "fim_sep": ("tokenizer.ggml.fim_sep_token_id",),
}
_MODELS = ("llama", "gpt2", "gemma4", "whitespace")


@dataclass
class _Vocab:
    """The tokenizer part of a GGUF, read and checked, with llama.cpp's derived attributes."""

    source: str
    model: str
    pre: PreTokenizerType | None
    tokens: list[str]
    scores: list[float]
    attrs: list[int]
    merges: list[str]
    ids: dict[str, int | None]
    eog: set[int] = field(default_factory=set)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    lowercase: bool = False


def _fail(source: str, problem: str) -> TokenizerError:
    return TokenizerError(f"{source}: {problem}")


def _string_list(metadata: Mapping[str, Any], key: str, source: str, required: bool) -> list[str]:
    value = metadata.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        problem = "is missing" if value is None else "must be a list of strings"
        raise _fail(source, f"{key} {problem}")
    return value


def _number_list(metadata: Mapping[str, Any], key: str, count: int, source: str) -> list[Any] | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, (int, float)) for item in value):
        raise _fail(source, f"{key} must be a list of numbers")
    if len(value) < count:
        raise _fail(source, f"{key} has {len(value)} entries for {count} tokens")
    return value


def _flag(metadata: Mapping[str, Any], key: str, default: bool, source: str) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, bool):
        raise _fail(source, f"{key} must be true or false")
    return value


def _pre_type(model: str, metadata: Mapping[str, Any], source: str) -> PreTokenizerType | None:
    if model == "llama":
        return None  # SentencePiece ignores tokenizer.ggml.pre
    if model == "gemma4":
        return PRE_TOKENIZERS["gemma4"]
    name = metadata.get("tokenizer.ggml.pre") or "default"  # llama.cpp warns and uses the default
    if not isinstance(name, str):
        raise _fail(source, "tokenizer.ggml.pre must be a string")
    if name not in PRE_TOKENIZERS:
        raise _fail(source, f"unknown pre-tokenizer {name!r} (tokenizer.ggml.pre)")
    return PRE_TOKENIZERS[name]


def _read_vocab(metadata: Mapping[str, Any], source: str) -> _Vocab:
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise _fail(source, "no tokenizer: tokenizer.ggml.model is missing")
    if model not in _MODELS:
        raise _fail(
            source,
            f"tokenizer model {model!r} is not supported (llmchat reads llama/SentencePiece, gpt2/BPE and gemma4)",
        )
    pre = _pre_type(model, metadata, source)
    tokens = _string_list(metadata, "tokenizer.ggml.tokens", source, required=True)
    count = len(tokens)
    tokens = [token or f"[EMPTY_{i}]" for i, token in enumerate(tokens)]
    if len(set(tokens)) != count:
        raise _fail(source, "tokenizer.ggml.tokens lists the same token twice")
    scores = _number_list(metadata, "tokenizer.ggml.scores", count, source)
    types = _number_list(metadata, "tokenizer.ggml.token_type", count, source)
    merges = _string_list(metadata, "tokenizer.ggml.merges", source, required=model == "gemma4")
    if model == "gpt2" and "tokenizer.ggml.merges" not in metadata and pre is not PRE_TOKENIZERS["kimi-k2"]:
        raise _fail(source, "tokenizer.ggml.merges is missing (a gpt2 tokenizer needs its BPE merges)")
    attrs = [_TYPE_ATTRS.get(int(t), _Attr.UNDEFINED) for t in types[:count]] if types else [_Attr.NORMAL] * count
    vocab = _Vocab(
        source=source,
        model=model,
        pre=pre,
        tokens=tokens,
        scores=[float(s) for s in scores[:count]] if scores else [0.0] * count,
        attrs=attrs,
        merges=merges,
        ids=_special_ids(metadata, model, pre, count),
    )
    spm = model == "llama"
    vocab.add_bos = _flag(metadata, "tokenizer.ggml.add_bos_token", spm or bool(pre and pre.add_bos), source)
    vocab.add_eos = _flag(metadata, "tokenizer.ggml.add_eos_token", False, source)
    if pre is not None and pre.name == "GEMMA4":
        vocab.add_bos = True  # llama.cpp overrides the file for Gemma 4
    vocab.add_space_prefix = _flag(metadata, "tokenizer.ggml.add_space_prefix", spm, source)
    vocab.lowercase = _flag(metadata, "tokenizer.ggml.normalizer.lowercase", False, source)
    _derive_attributes(vocab, metadata)
    return vocab


def _special_ids(
    metadata: Mapping[str, Any], model: str, pre: PreTokenizerType | None, count: int
) -> dict[str, int | None]:
    """Special token ids: the GGUF's, else llama.cpp's defaults (SentencePiece: <unk>=0, <s>=1, </s>=2).

    llama.cpp's default BOS/EOS for BPE vocabularies is token 11, a leftover of GPT-NeoX; a file
    without them gets none here instead. Out-of-range ids are ignored, as llama.cpp does.
    """
    ids: dict[str, int | None] = dict.fromkeys(_SPECIAL_ID_KEYS)
    if model == "llama":
        ids.update(bos=1, eos=2, unk=0)
    for name, keys in _SPECIAL_ID_KEYS.items():
        default = ids[name]
        if (default is not None and default >= count) or (name == "bos" and pre is not None and pre.no_bos):
            ids[name] = None
        for key in keys:
            value = metadata.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
                ids[name] = value
    return ids


def _derive_attributes(vocab: _Vocab, metadata: Mapping[str, Any]) -> None:
    """llama.cpp's fix-ups of the token types by token text, and its end-of-generation set."""
    attrs, ids = vocab.attrs, vocab.ids
    by_text = {text: i for i, text in enumerate(vocab.tokens)}
    # llama.cpp takes the first candidate it meets in its hash map (an arbitrary one when there are
    # several, e.g. Llama 3's <|eot_id|> and <|end_of_text|>); here the first in its list.
    for name, texts in (("eot", _EOT_TEXTS), ("eom", ["<|eom_id|>"]), *((k, v.split()) for k, v in _FIM_TEXTS.items())):
        found = [by_text[text] for text in texts if text in by_text]
        if ids[name] is None and found:
            ids[name] = found[0]
            attrs[found[0]] |= _Attr.CONTROL
    for token_id, attr in enumerate(attrs):
        if attr & _Attr.CONTROL and "unused" in vocab.tokens[token_id]:
            attrs[token_id] |= _Attr.UNUSED
    eog = {i for name in ("fim_pad", "fim_rep", "fim_sep") if (i := ids[name]) is not None}
    for text in _EOG_TEXTS:
        if text in by_text:
            eog.add(by_text[text])
            attrs[by_text[text]] |= _Attr.CONTROL
    for text in _ALWAYS_USER_DEFINED:
        if text in by_text:
            attrs[by_text[text]] = _Attr.USER_DEFINED
    eog.update(i for name in ("eos", "eot", "eom") if (i := ids[name]) is not None)
    eog_texts = {vocab.tokens[i]: i for i in eog}
    # o200k_harmony (gpt-oss) and solar-open end turns with <|return|>/<|call|>: <|end|> is plain text there.
    calls = "<|call|>" in eog_texts or "<|calls|>" in eog_texts
    if "<|end|>" in eog_texts and calls and ("<|return|>" in eog_texts or "<|flush|>" in eog_texts):
        eog.discard(eog_texts["<|end|>"])
        attrs[eog_texts["<|end|>"]] = _Attr.USER_DEFINED
    # Gemma 4 and PLaMo have a normal </s>.
    if "</s>" in eog_texts and ("<|tool_response>" in eog_texts or "<|plamo:eos|>" in eog_texts):
        eog.discard(eog_texts["</s>"])
        attrs[eog_texts["</s>"]] = _Attr.NORMAL
    vocab.eog = eog
    _strip_attributes(vocab, metadata, by_text)


def _strip_attributes(vocab: _Vocab, metadata: Mapping[str, Any], by_text: dict[str, int]) -> None:
    """Per-model lstrip/rstrip of special tokens (llama.cpp sets them by model name)."""
    attrs = vocab.attrs
    name = str(metadata.get("general.name", "")).lower()
    pre = str(metadata.get("tokenizer.ggml.pre", ""))
    arch = str(metadata.get("general.architecture", ""))

    def set_flag(text: str, flag: int, on: bool) -> None:
        if text in by_text:
            i = by_text[text]
            attrs[i] = attrs[i] | flag if on else attrs[i] & ~flag

    jina = any(p in pre for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
    if jina or arch in ("nomic-bert-moe", "jina-bert-v3"):
        set_flag("<mask>", _Attr.LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        for i, attr in enumerate(attrs):
            if attr & (_SPECIAL | _Attr.USER_DEFINED):
                attrs[i] = attr | _Attr.RSTRIP
        set_flag("</s>", _Attr.RSTRIP, True)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            set_flag(text, _Attr.RSTRIP, False)
    elif "modern-bert" in name:
        set_flag("[MASK]", _Attr.LSTRIP, True)


# ---------------------------------------------------------------------------------------------
# building the `tokenizers` pipeline


def _spm_merges(vocab: _Vocab, ids: Mapping[str, int]) -> list[tuple[str, str]]:
    """SentencePiece's merge rule as BPE merges: any split of a token into two tokens, ranked by the
    token's score (highest first), then by the longer left part, as transformers' converter does."""
    merges: list[tuple[float, int, int, str, str]] = []
    for text, score in zip(vocab.tokens, vocab.scores):
        local = []
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                local.append((ids[left], ids[right], left, right))
        local.sort()
        merges.extend((score, len(left), len(right), left, right) for _, _, left, right in local)
    merges.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for _, _, _, left, right in merges]


def _bpe_merges(vocab: _Vocab) -> list[tuple[str, str]]:
    """The file's merges as pairs ("left right", cut at the first space after the first
    character, as llama.cpp does), each pair once, at its first rank."""
    pairs = []
    for merge in dict.fromkeys(vocab.merges):
        left, _, right = merge.partition(" ")
        if not left:  # a left part that starts with a space
            cut = merge.find(" ", 1)
            left, right = (merge[:cut], merge[cut + 1 :]) if cut > 0 else ("", "")
        if left or right:
            pairs.append((left, right))
    return pairs


def _valid_merges(pairs: list[tuple[str, str]], ids: Mapping[str, int]) -> list[tuple[str, str]]:
    """The merges `tokenizers` can hold: both parts and the result are tokens. (llama.cpp keeps
    the others; they merge into a word that is not a token and then falls back to bytes.)"""
    return [(left, right) for left, right in pairs if left in ids and right in ids and left + right in ids]


def _sentencepiece_backend(vocab: _Vocab, ids: dict[str, int]) -> tokenizers.Tokenizer:
    unk = vocab.ids["unk"]
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=ids,
            merges=_spm_merges(vocab, ids),
            unk_token=vocab.tokens[unk] if unk is not None else None,
            byte_fallback=True,
        )
    )
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", SPACE)]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = _spm_decoder(strip_first_space=vocab.add_space_prefix)
    return backend


def _spm_decoder(strip_first_space: bool) -> decoders.Decoder:
    steps: list[decoders.Decoder] = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_first_space:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def _bpe_backend(vocab: _Vocab, ids: dict[str, int]) -> tokenizers.Tokenizer:
    pre = vocab.pre
    assert pre is not None
    pairs = _bpe_merges(vocab)

    def bpe(merges: list[tuple[str, str]]) -> models.BPE:
        return models.BPE(vocab=ids, merges=merges, ignore_merges=pre.ignore_merges, byte_fallback=not pre.byte_level)

    try:
        model = bpe(pairs)
    except Exception:  # a merge that is not made of tokens: keep those that are (slower, and rare)
        model = bpe(_valid_merges(pairs, ids))
    backend = tokenizers.Tokenizer(model)
    steps: list[normalizers.Normalizer] = []
    if vocab.model == "whitespace" and vocab.lowercase:
        steps.append(normalizers.Lowercase())
    if pre.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Sequence(_splits(vocab.model, pre))
    if pre.byte_level:
        backend.decoder = decoders.ByteLevel()
    elif pre.escape_whitespaces:
        backend.decoder = _spm_decoder(strip_first_space=False)
    else:
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _splits(model: str, pre: PreTokenizerType) -> list[pre_tokenizers.PreTokenizer]:
    """llama.cpp's regexes in order, each piece of one split cut again by the next; then GPT-2's
    byte-to-unicode spelling."""
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in pre.regexes
    ]
    if model == "whitespace":  # llama.cpp's whitespace tokenizer drops the whitespace first
        steps.insert(0, pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"))
    if pre.byte_level:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return steps


def _add_special_tokens(backend: tokenizers.Tokenizer, vocab: _Vocab) -> None:
    """Control/unknown tokens as special added tokens, user-defined ones as plain added tokens:
    matched in the raw text before anything else, as llama.cpp's tokenizer_st_partition does."""
    special: list[AddedToken] = []
    plain: list[AddedToken] = []
    for text, attr in zip(vocab.tokens, vocab.attrs):
        if not attr & (_SPECIAL | _Attr.USER_DEFINED):
            continue
        is_special = bool(attr & _SPECIAL)
        token = AddedToken(
            text,
            special=is_special,
            normalized=False,
            lstrip=bool(attr & _Attr.LSTRIP),
            rstrip=bool(attr & _Attr.RSTRIP),
        )
        (special if is_special else plain).append(token)
    if plain:
        backend.add_tokens(plain)
    if special:
        backend.add_special_tokens(special)


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str) -> Tokenizer:
    """The tokenizer a GGUF file describes (`metadata` as GGUFReader's field contents; `source`
    names the file in error messages)."""
    vocab = _read_vocab(metadata, source)
    ids = {text: i for i, text in enumerate(vocab.tokens)}
    try:
        backend = _sentencepiece_backend(vocab, ids) if vocab.model == "llama" else _bpe_backend(vocab, ids)
        _add_special_tokens(backend, vocab)
    except Exception as exc:  # the Rust side raises a bare Exception for a vocabulary it rejects
        raise _fail(source, f"cannot build the tokenizer: {' '.join(str(exc).split())}") from None
    bos, eos = vocab.ids["bos"], vocab.ids["eos"]
    return Tokenizer(
        backend,
        bos_token=vocab.tokens[bos] if bos is not None else None,
        eos_token=vocab.tokens[eos] if eos is not None else None,
        add_bos_token=vocab.add_bos,
        add_eos_token=vocab.add_eos,
    )


def end_of_generation_ids(metadata: Mapping[str, Any], source: str) -> list[int]:
    """Ids that end generation in llama.cpp (EOS, EOT, EOM and the end-of-turn tokens it knows by
    text, such as <|im_end|> and <|eot_id|>), sorted."""
    return sorted(_read_vocab(metadata, source).eog)


def special_token_ids(metadata: Mapping[str, Any], source: str) -> dict[str, int]:
    """The special token ids llama.cpp uses (bos, eos, eot, eom, unk, pad, fim_*), where present."""
    return {name: i for name, i in _read_vocab(metadata, source).ids.items() if i is not None}


__all__: Sequence[str] = ("end_of_generation_ids", "special_token_ids", "tokenizer_from_gguf")
