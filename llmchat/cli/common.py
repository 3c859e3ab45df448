"""What the headless commands share: errors, reading files, JSON output, the model, sampling and
prompt options, and loading a model (torch is imported only when a command loads one)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmchat.cli.args import EngineOptions, add_engine_options, positive_int, sampling_value, whole_number
from llmchat.engine.errors import LLMChatError
from llmchat.engine.knobs import KNOB, KNOBS
from llmchat.engine.prompt import CHAT, COMPLETION, PromptMode
from llmchat.models import resolve_model
from llmchat.paths import cache_dir

if TYPE_CHECKING:
    from llmchat.session import ServerSpec, Session, SessionInfo


class CLIError(LLMChatError):
    """Bad command-line input (a file that is not there, JSON that does not parse...)."""


def read_text_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {exc}") from None


def read_json_file(path: str) -> Any:
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON: {exc}") from None


def _finite(data: Any) -> Any:
    """NaN (a number a server did not report) as null: JSON has no NaN."""
    if isinstance(data, float) and data != data:
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def print_json(data: Any) -> None:
    print(json.dumps(_finite(data), ensure_ascii=False, allow_nan=False))


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="registered name, demo, or path (default: the default)",
    )
    add_engine_options(p)
    remote = p.add_argument_group("a model on a server (OpenAI-compatible: vLLM, SGLang, llama-server, Ollama)")
    remote.add_argument("--model", dest="server_model", default=None, metavar="NAME", help="the server's model name")
    add_server_options(remote)


def add_server_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, dest_prefix: str = "") -> None:
    """--server, --api-key-env, --tokenizer (`dest_prefix`: the bare chat's own, `chat_server`...)."""
    p.add_argument(
        "--server", dest=dest_prefix + "server", default=None, metavar="URL", help="e.g. http://127.0.0.1:8080"
    )
    p.add_argument(
        "--api-key-env",
        dest=dest_prefix + "api_key_env",
        default=None,
        metavar="VAR",
        help="the environment variable holding the server's API key (the key itself is never saved)",
    )
    p.add_argument(
        "--ollama",
        dest=dest_prefix + "ollama",
        action="store_true",
        help="the server is Ollama: use its native /api/chat (its OpenAI layer works without this)",
    )
    p.add_argument(
        "--tokenizer",
        dest=dest_prefix + "tokenizer",
        default=None,
        metavar="PATH",
        help="a local copy of the server model's folder or GGUF: its template and tokenizer for the prompt view",
    )


def server_spec(args: argparse.Namespace, prefix: str = "") -> ServerSpec | None:
    """The server a command or the chat talks to: --server URL, or a model registered with
    `llmchat models add NAME --server URL`; None for a local model."""
    from llmchat.models import remote_model
    from llmchat.session import ServerSpec

    url = getattr(args, prefix + "server", None)
    if prefix:
        name = getattr(args, prefix + "model", None)
    else:
        name = getattr(args, "server_model", None) or getattr(args, "model", None)
    key_env = getattr(args, prefix + "api_key_env", None)
    protocol = "ollama" if getattr(args, prefix + "ollama", False) else "openai"
    tokenizer = getattr(args, prefix + "tokenizer", None)
    if url is None:
        registered = remote_model(name)
        if registered is None:
            if getattr(args, "server_model", None) and not prefix:
                raise CLIError("--model names a server's model: give the server with --server URL")
            return None
        url, name, key_env = registered.url, registered.model, key_env or registered.api_key_env
    return ServerSpec(url=url, model=name, api_key_env=key_env, tokenizer=tokenizer, protocol=protocol)


def add_sampling_options(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    top_k_flag: str = "--top-k",
    temperature_help: str = "0 = greedy",
    dest_prefix: str = "",
    knobs: tuple[str, ...] = (*KNOB, "seed", "max_new_tokens"),
) -> None:
    """The sampling policy's knobs (dest names match SamplingParams; see `_sampling`), each checked
    as it is parsed.

    `top_k_flag`: how the sampling top-k is spelled, for a subcommand whose `--top-k` means
    something else (`inspect`: candidates shown); its dest stays `top_k`. `dest_prefix` and
    `knobs`: the chat's own group (`chat_temperature`...) takes a subset.
    """
    helps = {knob.name: knob.help for knob in KNOBS} | {
        "temperature": temperature_help,
        "top_k": ("" if top_k_flag == "--top-k" else "sampling top-k: ") + KNOB["top_k"].help,
        "seed": "makes sampling reproducible",
        "max_new_tokens": "answer length limit, at least 1 (default: the model's)",
    }
    types: dict[str, Callable[[str], Any]] = {
        "seed": whole_number,
        "max_new_tokens": positive_int,
    }
    for knob in knobs:
        flag = top_k_flag if knob == "top_k" else "--" + knob.replace("_", "-")
        p.add_argument(
            flag,
            dest=dest_prefix + knob,
            type=types.get(knob) or sampling_value(knob),
            default=None,
            metavar="K" if knob == "top_k" else "N" if knob in types else "X",
            help=helps[knob],
        )


def load_model(args: argparse.Namespace):  # -> LoadedModel (imported lazily: torch is slow to import)
    import torch

    from llmchat.engine import load

    options = EngineOptions.of(args)
    if options.threads:
        torch.set_num_threads(options.threads)
    return load(resolve_model(args.model), cache_dir=cache_dir() / "packed", **options.load_kwargs())


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    """The prompt of a one-shot answer (`run`, `inspect`); `request_messages` and `prompt_mode` read them."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system prompt (raw: plain text on a line before the prompt)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--raw",
        action="store_true",
        help="no chat template: the prompt is plain text the model continues (the default for a base model)",
    )
    mode.add_argument("--chat", action="store_true", help="through the chat template (the default when there is one)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def open_session(args: argparse.Namespace, top_k: int) -> Session:
    """The model the command names, loaded (or on its server), as a session that reports `top_k`
    candidates per token."""
    spec = server_spec(args)
    if spec is not None:
        from llmchat.session.remote import RemoteSession

        return RemoteSession(spec, top_k=top_k)
    from llmchat.session import LocalSession

    return LocalSession(load_model(args), top_k=top_k)


def failed_answer(event: Any) -> int:
    """After a Finished event: a server that failed mid-answer is an error (exit 2), the text so far
    already printed; 0 otherwise."""
    if getattr(event, "reason", "") != "error":
        return 0
    print(f"llmchat: error: {event.error} (the answer is cut there)", file=sys.stderr)
    return 2


def prompt_mode(info: SessionInfo, args: argparse.Namespace) -> PromptMode:
    """Raw (completion) with --raw, or by itself for a base model (no chat template: `info` says
    "base"), saying so on stderr; the chat template otherwise, or with --chat."""
    if args.raw:
        return COMPLETION
    if info.chat:
        return CHAT
    if args.chat:
        raise CLIError(f"{info.name} has no chat template (a base model), so --chat cannot apply; drop it")
    print(
        f"llmchat: {info.name} is a base model (no chat template): the prompt is sent as plain text "
        "for the model to continue (raw mode)",
        file=sys.stderr,
    )
    return COMPLETION


def request_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    """`--system` and `--prompt` as a conversation."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": args.prompt}]


def sampling_from(args: argparse.Namespace, defaults):
    """The model's sampling defaults with the knobs given on the command line."""
    changes = {name: getattr(args, name) for name in (*KNOB, "seed")}
    try:
        return defaults.replace(**{k: v for k, v in changes.items() if v is not None})
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def shown(text: str) -> str:
    """A token as a quoted string with escapes, so spaces, newlines and empty text are visible."""
    return json.dumps(text, ensure_ascii=False)
