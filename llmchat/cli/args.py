"""What every command's arguments share: the parser class, value checks, and the engine flags.

Values are checked where they are parsed (argparse `type=`), so a bad one is refused before a
model loads, in the one-line form every error takes (`llmchat: error: ...`, exit code 2). The
sampling knobs are checked by `SamplingParams` itself: its ranges are the only ones.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from llmchat.engine.generate import DEFAULT_PREFILL_CHUNK
from llmchat.engine.knobs import KNOB
from llmchat.engine.sampling import SamplingParams

EXIT_USAGE = 2
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # as runtime.resolve_dtype


class Parser(argparse.ArgumentParser):
    """argparse with llmchat's error form: one line on stderr, exit code 2 (no usage dump).

    Subcommand parsers are made by `add_subparsers`, which uses the parent's class, so every
    command gets this.
    """

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"llmchat: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


# --- value checks (argparse `type=` functions) -----------------------------------------------


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def whole_number(text: str) -> int:
    """Any integer (a seed)."""
    return _whole(text)


def positive_int(text: str) -> int:
    """An integer >= 1 (token counts, lengths, thread counts)."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (where 0 means "none" or "off")."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, sorted and without repeats (`--contexts 256,1024`)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"takes comma-separated token counts, got {text!r}")
    try:
        return sorted({positive_int(part) for part in parts})
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"takes comma-separated token counts: {exc}") from None


def sampling_value(knob: str) -> Callable[[str], Any]:
    """A check for one SamplingParams knob (temperature, top_k, top_p, min_p, repetition_penalty):
    its type and range are SamplingParams' own."""
    kind = KNOB[knob].kind

    def check(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
        try:
            SamplingParams(**{knob: value})
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{knob} ")) from None
        return value

    check.__name__ = knob  # argparse names the type in some messages
    return check


# --- the engine flags: how a model is loaded --------------------------------------------------


def add_engine_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, dest_prefix: str = "") -> None:
    """--device, --dtype, --context, --threads, --prefill-chunk, --dequantize.

    `dest_prefix` keeps the top-level (chat) parser's values apart from a subcommand's, which
    argparse would otherwise overwrite with the subcommand's defaults.
    """
    d = dest_prefix
    p.add_argument(
        "--device", dest=f"{d}device", default="auto", metavar="D", help="auto (CUDA if present), cpu, cuda, cuda:N"
    )
    p.add_argument(
        "--dtype",
        dest=f"{d}dtype",
        default="auto",
        choices=DTYPES,
        metavar="T",
        help="weights' dtype: auto (float32 on CPU, bfloat16/float16 on CUDA), float32, bfloat16, float16",
    )
    p.add_argument(
        "--context",
        dest=f"{d}context",
        type=positive_int,
        default=None,
        metavar="N",
        help="context length: tokens the KV cache holds (default: the model's, memory-capped)",
    )
    p.add_argument(
        "--threads",
        dest=f"{d}threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="CPU threads at most (default: torch's); decode drops to one while that measures faster (a busy machine)",
    )
    p.add_argument(
        "--prefill-chunk",
        dest=f"{d}prefill_chunk",
        type=positive_int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N",
        help=f"tokens per prefill chunk (default {DEFAULT_PREFILL_CHUNK})",
    )
    p.add_argument(
        "--dequantize",
        dest=f"{d}dequantize",
        action="store_true",
        help="dequantize a GGUF's quantized weights to float at load (the exact reference; slower)",
    )


@dataclass(frozen=True)
class EngineOptions:
    """The engine flags as given; `load_kwargs` is what `llmchat.load` takes of them."""

    device: str = "auto"
    dtype: str = "auto"
    context: int | None = None
    threads: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    dequantize: bool = False

    @classmethod
    def of(cls, args: argparse.Namespace, dest_prefix: str = "") -> EngineOptions:
        return cls(
            **{name: getattr(args, dest_prefix + name) for name in cls.__dataclass_fields__}  # type: ignore[arg-type]
        )

    def load_kwargs(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "context_length": self.context,
            "prefill_chunk": self.prefill_chunk,
            "packed": False if self.dequantize else None,
        }
