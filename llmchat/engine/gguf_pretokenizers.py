"""llama.cpp's BPE pre-tokenizers: the `tokenizer.ggml.pre` names it knows and how each splits text.

A byte-level BPE vocabulary only reproduces the model's tokens when the text is first cut into
words exactly as at training time. llama.cpp keeps one list of regexes per pre-tokenizer type
(`llm_tokenizer_bpe` in src/llama-vocab.cpp) plus a few per-type flags (`llama_vocab::impl::load`);
this module is that table, written for Oniguruma (the regex engine of the `tokenizers` library).

Where llama.cpp does not run its regex literally, the regex here is written to do what llama.cpp
does instead:
- llama.cpp runs regexes with \\p{..} classes on a "collapsed" text in which every non-ASCII code
  point is replaced by one stand-in per Unicode category, and it maps \\p{Lu}, \\p{Ll}, \\p{Lt},
  \\p{Lm} and \\p{Lo} all to "letter". So case-splitting patterns (tiny_aya, youtu) do not split
  "HelloWorld" in llama.cpp; `_collapse_letter_cases` gives Oniguruma the same reading.
- Some regex strings only select hand-written splitters in src/unicode.cpp: kimi-k2's "\\p{Han}+"
  stands for all of Kimi's patterns (with its letter cases collapsed as well), "\\p{AFMoE_digits}"
  and tiny_aya's digit pattern both cut a digit run into a 1-2 digit head and groups of three.
- `$` is ECMAScript's end of input in std::regex but end of line in Oniguruma: written `\\z`.
- std::wregex's `\\d` in the C locale is [0-9]: written so.
- The GPT-2 pattern llama.cpp lists lacks the final `|\\s+`, but its hand-written splitter behaves
  as if it were there, so it is written with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_ASCII_PUNCT_WORD = r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_DEEPSEEK_CJK = "[[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]&&[^\\s]]+"
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_NO_PUNCT_WORD = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
# llama.cpp's AFMoE digit splitter: a digit run is cut into a head of len % 3 digits, then groups of
# three (1234567 -> 1 234 567); the text before a run stays with its first group.
_DIGIT_GROUPS = r"\P{N}*\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"
_NEWLINE_RUNS = r"[^\n]+|[\n]+"
# GPT-4o style: an optional leading non-letter, then letters that are "not a-z" followed by letters
# that are "not A-Z" (llama.cpp's ASCII-only rewrite of the case classes).
_GPT4O_WORDS = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + r"?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + r"?"
)
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + r"?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + r"?"
)
# unicode_cpt_is_han() in llama.cpp's unicode.cpp (narrower than Unicode's Han script).
_HAN = (
    "\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f\U0002b740-\U0002b81f"
    "\U0002b820-\U0002ceaf\U0002ceb0-\U0002ebef\uf900-\ufaff\U0002f800-\U0002fa1f"
)
_KIMI_K2 = (
    f"[{_HAN}]+"
    rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_HAN}]]+{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _collapse_letter_cases(regex: str) -> str:
    """llama.cpp reads \\p{Lu}/\\p{Ll}/\\p{Lt}/\\p{Lm}/\\p{Lo} as plain \\p{L} (see the module docstring)."""
    return re.sub(r"\\p\{L[ultmo]\}", r"\\p{L}", regex)


# llama.cpp's LLAMA_VOCAB_PRE_TYPE_* → its regexes, in the order they are applied.
PRE_TYPE_REGEXES: dict[str, tuple[str, ...]] = {
    "DEFAULT": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "LLAMA3": (_LLAMA3,),
    "JAIS2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
        r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
    ),
    "DBRX": (_LLAMA3,),
    "SMAUG": (_LLAMA3,),
    "DEEPSEEK_LLM": (
        r"[\r\n]",
        _DEEPSEEK_LETTERS,
        "\\s?[[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]&&[^\\s]]+",
        r"\s+\z",
        _DEEPSEEK_CJK,
        r"\p{N}+",
    ),
    "DEEPSEEK3_LLM": (
        r"\p{N}{1,3}",
        _CJK_KANA,
        _ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "SPARK2_5": (
        r"\p{N}{1,3}",
        _CJK_KANA,
        _ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+",
        r"\p{N}",
    ),
    "YOUTU": (
        "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c"
        "\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _CJK_KANA,
        _collapse_letter_cases(
            _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
    ),
    "DEEPSEEK_CODER": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"),
    "FALCON": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "STARCODER": (r"\p{N}", _GPT2),
    "GPT2": (_GPT2,),
    "QWEN2": (_QWEN2,),
    "QWEN35": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "PORO": (_NO_PUNCT_WORD,),
    "CHATGLM4": (_LLAMA3,),
    "VIKING": (_NO_PUNCT_WORD, r"\p{N}"),
    "TEKKEN": (
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
        r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "CHAMELEON": (
        r"<sentinel:[0-9]+>",
        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        _GPT2,
    ),
    "GPT4O": (_GPT4O_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "GRANITE_EMB_MULTI": (
        (_GPT4O_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+").replace(
            r"(?=[\p{L}])", r"(?=[\p{L}\p{M}])"
        ),
    ),
    "TINY_AYA": (
        _DIGIT_GROUPS,
        _collapse_letter_cases(
            _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
    ),
    "KIMI_K2": (_KIMI_K2,),
    "SUPERBPE": (r"\p{N}+", r"(?=([0-9]{3})+(?![0-9]))"),
    "BAILINGMOE": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "SEED_CODER": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "UFAKZEKA": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "AFMOE": (
        _DIGIT_GROUPS,
        "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf"
        "\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af"
        "\u1100-\u11ff]+",
        _ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "LAGUNA": (_NEWLINE_RUNS, _QWEN2),
    "EXAONE_MOE": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "GEMMA4": (_NEWLINE_RUNS,),
    "MINICPM5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "WHITESPACE": (r"\S+",),
}
# Types that share another type's regexes.
for _alias, _same in {
    "HUNYUAN_DENSE": "DEEPSEEK3_LLM",
    "JOYAI_LLM": "DEEPSEEK3_LLM",
    "HY_V4": "DEEPSEEK3_LLM",
    "REFACT": "STARCODER",
    "COMMAND_R": "STARCODER",
    "SMOLLM": "STARCODER",
    "CODESHELL": "STARCODER",
    "EXAONE": "STARCODER",
    "MINERVA": "STARCODER",
    "MELLUM2": "STARCODER",
    "MPT": "GPT2",
    "OLMO": "GPT2",
    "JAIS": "GPT2",
    "TRILLION": "GPT2",
    "GRANITE_DOCLING": "GPT2",
    "STABLELM2": "QWEN2",
    "HUNYUAN": "QWEN2",
    "SOLAR_OPEN": "QWEN2",
    "GROK_2": "QWEN2",
    "BLOOM": "PORO",
    "GPT3_FINNISH": "PORO",
    "MINIMAX_M2": "GPT4O",
    "SARVAM_MOE": "GEMMA4",
}.items():
    PRE_TYPE_REGEXES[_alias] = PRE_TYPE_REGEXES[_same]


@dataclass(frozen=True)
class PreTokenizerType:
    """What one `tokenizer.ggml.pre` name means to llama.cpp (llama_vocab::impl::load).

    ignore_merges: a word that is itself a vocabulary token is emitted whole, without BPE merges.
    add_bos: BOS is added by default (the GGUF's add_bos_token flag overrides it, except for
    Gemma 4, where llama.cpp forces it on).
    byte_level: words are spelled with GPT-2's byte-to-unicode mapping; without it BPE runs on raw
    UTF-8 and falls back to <0xNN> byte tokens (Gemma 4, Sarvam, the whitespace tokenizer).
    escape_whitespaces: spaces are written as ▁ before BPE (SentencePiece style: Gemma 4, Sarvam).
    no_bos: the model has no BOS token unless the GGUF names one (ChatGLM/GLM).
    clean_spaces: llama_detokenize's clean-up of spaces before punctuation; recorded, not applied
    (see gguf_vocab's module docstring).
    """

    name: str
    ignore_merges: bool = False
    add_bos: bool = False
    byte_level: bool = True
    escape_whitespaces: bool = False
    no_bos: bool = False
    clean_spaces: bool = True

    @property
    def regexes(self) -> tuple[str, ...]:
        return PRE_TYPE_REGEXES[self.name]


def _types(names: str, pre_type: str, **flags: bool) -> dict[str, PreTokenizerType]:
    return dict.fromkeys(names.split(), PreTokenizerType(pre_type, **flags))


# Every `tokenizer.ggml.pre` value llama.cpp accepts for a BPE vocabulary (llama_vocab::impl::load).
PRE_TOKENIZERS: dict[str, PreTokenizerType] = {
    **_types("default", "DEFAULT"),
    **_types("minicpm5", "MINICPM5", ignore_merges=True),
    **_types(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        "LLAMA3",
        ignore_merges=True,
        add_bos=True,
    ),
    **_types("deepseek-llm", "DEEPSEEK_LLM", clean_spaces=False),
    **_types("deepseek-coder", "DEEPSEEK_CODER", clean_spaces=False),
    **_types("deepseek-v3", "DEEPSEEK3_LLM", clean_spaces=False),
    **_types("spark2_5", "SPARK2_5", clean_spaces=False),
    **_types("youtu", "YOUTU", clean_spaces=False, ignore_merges=True),
    **_types("falcon", "FALCON"),
    **_types("mpt", "MPT"),
    **_types("starcoder", "STARCODER"),
    **_types("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert", "GPT2"),
    **_types("jais-2", "JAIS2"),
    **_types("gemma4 granite-embed-multi-311m", "GEMMA4", byte_level=False, escape_whitespaces=True, add_bos=True),
    **_types("sarvam-moe", "SARVAM_MOE", byte_level=False, escape_whitespaces=True, clean_spaces=False),
    **_types("jina-v1-en jina-v2-code roberta-bpe", "GPT2"),
    **_types("whitespace", "WHITESPACE", byte_level=False),
    **_types("refact", "REFACT"),
    **_types("command-r", "COMMAND_R", clean_spaces=False),
    **_types("qwen2 deepseek-r1-qwen kormo f2llmv2", "QWEN2", clean_spaces=False),
    **_types("qwen35", "QWEN35", clean_spaces=False),
    **_types("stablelm2", "STABLELM2"),
    **_types("olmo", "OLMO"),
    **_types("dbrx", "DBRX"),
    **_types("smaug-bpe", "SMAUG"),
    **_types("poro-chat", "PORO", clean_spaces=False),
    **_types("chatglm-bpe", "CHATGLM4", no_bos=True),
    **_types("glm4 glm5", "CHATGLM4", no_bos=True, ignore_merges=True),
    **_types("viking", "VIKING", clean_spaces=False),
    **_types("jais", "JAIS"),
    **_types("tekken", "TEKKEN", clean_spaces=False, ignore_merges=True, add_bos=True),
    **_types("smollm", "SMOLLM", clean_spaces=False),
    **_types("codeshell", "CODESHELL"),
    **_types("bloom", "BLOOM"),
    **_types("gpt3-finnish", "GPT3_FINNISH"),
    **_types("exaone", "EXAONE"),
    **_types("exaone4", "GPT2"),
    **_types("exaone-moe", "EXAONE_MOE"),
    **_types("chameleon", "CHAMELEON", add_bos=True, clean_spaces=False),
    **_types("minerva-7b", "MINERVA"),
    **_types("megrez", "QWEN2"),
    **_types("gpt-4o llama4 kanana2 talkie", "GPT4O", clean_spaces=False),
    **_types("granite-embed-multi-97m", "GRANITE_EMB_MULTI", clean_spaces=False, ignore_merges=True),
    **_types("tiny_aya cohere2moe", "TINY_AYA", clean_spaces=False),
    **_types("superbpe", "SUPERBPE", clean_spaces=False),
    **_types("trillion", "TRILLION", clean_spaces=False),
    **_types("granite-docling", "GRANITE_DOCLING", clean_spaces=False),
    **_types("bailingmoe bailingmoe2 llada-moe", "BAILINGMOE", clean_spaces=False),
    **_types("seed-coder", "SEED_CODER", clean_spaces=False),
    **_types("hunyuan", "HUNYUAN", clean_spaces=False),
    **_types("hunyuan-dense", "HUNYUAN_DENSE", clean_spaces=False),
    **_types("hy_v4", "HY_V4", clean_spaces=False),
    **_types("joyai-llm", "JOYAI_LLM", clean_spaces=False),
    **_types("kimi-k2", "KIMI_K2", clean_spaces=False),
    **_types("ufakzeka", "UFAKZEKA", clean_spaces=False),
    **_types("grok-2", "GROK_2", clean_spaces=False),
    **_types("afmoe", "AFMOE", clean_spaces=False),
    **_types("laguna", "LAGUNA", clean_spaces=False),
    **_types("minimax-m2", "MINIMAX_M2", clean_spaces=False),
    **_types("solar-open", "SOLAR_OPEN", clean_spaces=False),
    **_types("mellum2", "MELLUM2"),
}
