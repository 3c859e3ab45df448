"""Command line: `llmchat` and its headless subcommands.

Every subcommand takes `--json` so it can be scripted and tested. Errors caused by input print one
line (`llmchat: error: ...`) and exit with code 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmchat.cli_args import (
    EXIT_USAGE,
    EngineOptions,
    Parser,
    add_engine_options,
    positive_int,
    sampling_value,
    whole_number,
)
from llmchat.cli_bench import add_bench_options, cmd_bench
from llmchat.cli_info import add_info_parsers
from llmchat.cli_models import add_models_parsers, cmd_chat
from llmchat.engine.errors import LLMChatError
from llmchat.engine.prompt import CHAT, COMPLETION, ChatTokens, PromptMode, request_text
from llmchat.models import resolve_model
from llmchat.paths import cache_dir


class CLIError(LLMChatError):
    """Bad command-line input (a file that is not there, JSON that does not parse...)."""


def _read_text_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {exc}") from None


def _read_json_file(path: str) -> Any:
    try:
        return json.loads(_read_text_file(path))
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON: {exc}") from None


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# shared options


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="registered name, demo, or path (default: the default)")
    add_engine_options(p)


def _add_sampling_options(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    top_k_flag: str = "--top-k",
    temperature_help: str = "0 = greedy",
    dest_prefix: str = "",
    knobs: tuple[str, ...] = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_new_tokens"),
) -> None:
    """The sampling policy's knobs (dest names match SamplingParams; see `_sampling`), each checked
    as it is parsed.

    `top_k_flag`: how the sampling top-k is spelled, for a subcommand whose `--top-k` means
    something else (`inspect`: candidates shown); its dest stays `top_k`. `dest_prefix` and
    `knobs`: the chat's own group (`chat_temperature`...) takes a subset.
    """
    helps = {
        "temperature": temperature_help,
        "top_k": ("" if top_k_flag == "--top-k" else "sampling top-k: ") + "keep only the K likeliest tokens (0 = off)",
        "top_p": "nucleus: keep the likeliest tokens up to this probability mass, in (0, 1] (1 = off)",
        "min_p": "drop tokens below this share of the likeliest one's probability, in [0, 1] (0 = off)",
        "repetition_penalty": "> 0 (1 = off)",
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


def _load(args: argparse.Namespace):  # -> LoadedModel (imported lazily: torch is slow to import)
    import torch

    from llmchat.engine import load

    options = EngineOptions.of(args)
    if options.threads:
        torch.set_num_threads(options.threads)
    return load(resolve_model(args.model), cache_dir=cache_dir() / "packed", **options.load_kwargs())


def _add_prompt_options(p: argparse.ArgumentParser) -> None:
    """The prompt of a one-shot answer (`run`, `inspect`); `_prompt_ids` turns them into tokens."""
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


def _prompt_mode(model: Any, args: argparse.Namespace) -> PromptMode:
    """Raw (completion) with --raw, or by itself for a base model (no chat template: `info` says
    "base"), saying so on stderr; the chat template otherwise, or with --chat."""
    if args.raw:
        return COMPLETION
    if model.traits.chat:
        return CHAT
    if args.chat:
        raise CLIError(f"{model.package.name} has no chat template (a base model), so --chat cannot apply; drop it")
    print(
        f"llmchat: {model.package.name} is a base model (no chat template): the prompt is sent as plain text "
        "for the model to continue (raw mode)",
        file=sys.stderr,
    )
    return COMPLETION


def _prompt_ids(model: Any, args: argparse.Namespace) -> tuple[list[int], PromptMode]:
    """Token ids of `--prompt` (with `--system`) and the mode they were made in: through the chat
    template, or as plain text (`--raw`, or a base model) with the tokenizer's BOS."""
    mode = _prompt_mode(model, args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    ids = ChatTokens(model.tokenizer).encode(request_text(model, messages, mode), mode)
    return ids, mode


def _sampling(args: argparse.Namespace, defaults):
    changes = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    try:
        return defaults.replace(**{k: v for k, v in changes.items() if v is not None})
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# run


def _event_dict(event: Any) -> dict[str, Any]:
    from dataclasses import asdict

    from llmchat.engine.events import Finished

    data = {"event": type(event).__name__, **asdict(event)}
    if isinstance(event, Finished):
        data["prefill_tokens_per_second"] = event.prefill_tokens_per_second
        data["decode_tokens_per_second"] = event.decode_tokens_per_second
    return data


def cmd_run(args: argparse.Namespace) -> int:
    from llmchat.engine.events import Finished, TokenEvent

    model = _load(args)
    ids, _ = _prompt_ids(model, args)
    events = model.generate(
        ids,
        sampling=_sampling(args, model.default_sampling),
        max_new_tokens=args.max_new_tokens,
        stop_strings=args.stop or (),
        top_k=args.top_logprobs,
    )
    for event in events:
        if args.json:
            _print_json(_event_dict(event))
        elif isinstance(event, TokenEvent):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finished):
            sys.stdout.write(event.tail + "\n")
            print(
                f"[{event.generated_tokens} tokens, stopped by {event.reason}; prefill {event.prefilled_tokens} tok "
                f"at {event.prefill_tokens_per_second:.1f} tok/s (reused {event.reused_tokens}), "
                f"TTFT {event.ttft_seconds:.3f} s, decode {event.decode_tokens_per_second:.1f} tok/s]",
                file=sys.stderr,
            )
    return 0


# ---------------------------------------------------------------------------------------------
# inspect


def _shown(text: str) -> str:
    """A token as a quoted string with escapes, so spaces, newlines and empty text are visible."""
    return json.dumps(text, ensure_ascii=False)


def _sampling_words(params: Any) -> str:
    """The sampling policy in words: the knobs that are on."""
    if params.greedy:
        words = ["greedy (temperature 0)"]
    else:
        words = [f"temperature {params.temperature:g}"]
        if params.top_k:
            words.append(f"top-k {params.top_k}")
        if params.top_p < 1.0:
            words.append(f"top-p {params.top_p:g}")
        if params.min_p > 0.0:
            words.append(f"min-p {params.min_p:g}")
        if params.seed is not None:
            words.append(f"seed {params.seed}")
    if params.repetition_penalty != 1.0:
        words.append(f"repetition penalty {params.repetition_penalty:g}")
    return ", ".join(words)


def _step_dict(event: Any, text: str) -> dict[str, Any]:
    """One decode step as JSON: the chosen token (`text`: its own text, like the candidates') and
    the top-k candidates, most likely first."""
    return {
        "event": "token",
        "index": event.index,
        "id": event.token_id,
        "text": text,
        "emitted": event.text,  # what the stream printed at this step (held back near a stop string)
        "logit": event.logit,
        "prob": event.prob,
        "policy_prob": event.policy_prob,
        "rank": event.rank,
        "entropy": event.entropy,
        "policy_entropy": event.policy_entropy,
        "seconds": event.seconds,
        "top": [
            {"id": t.token_id, "text": t.text, "logit": t.logit, "prob": t.prob, "policy_prob": t.policy_prob}
            for t in event.top
        ],
    }


def _print_step(step: dict[str, Any]) -> None:
    print(
        f"{step['index']:4d}  {_shown(step['text'])}  id {step['id']}  p {step['prob']:.1%}  "
        f"policy {step['policy_prob']:.1%}  rank {step['rank']}  H {step['entropy']:.2f} bits "
        f"(policy {step['policy_entropy']:.2f})  logit {step['logit']:.3f}  {step['seconds'] * 1000:.1f} ms"
    )
    print("      " + " · ".join(f"{_shown(t['text'])} {t['prob']:.1%}" for t in step["top"]))


def _summary(steps: list[dict[str, Any]], reason: str) -> str:
    line = f"{len(steps)} tokens, stopped by {reason}"
    if steps:
        mean = sum(s["entropy"] for s in steps) / len(steps)
        low = min(steps, key=lambda s: s["prob"])
        line += (
            f"; mean entropy {mean:.2f} bits; lowest probability {low['prob']:.1%} "
            f"at step {low['index']} ({_shown(low['text'])}, id {low['id']})"
        )
    return line


def cmd_inspect(args: argparse.Namespace) -> int:
    from llmchat.engine.events import Finished, TokenEvent

    model = _load(args)
    ids, mode = _prompt_ids(model, args)
    sampling = _sampling(args, model.default_sampling)
    if args.temperature is None:  # reproducible by default: the policy's other knobs stay as given
        sampling = sampling.replace(temperature=0.0)
    if not args.json:
        kind = " (raw: no chat template)" if mode == COMPLETION else ""
        print(f"model {model.package.path} · prompt {len(ids)} tokens{kind} · sampling: {_sampling_words(sampling)}")
    steps: list[dict[str, Any]] = []
    events = model.generate(
        ids,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        stop_strings=args.stop or (),
        top_k=args.candidates,
    )
    for event in events:
        if isinstance(event, TokenEvent):
            step = _step_dict(event, model.generator.token_text(event.token_id))
            steps.append(step)
            if args.json:
                _print_json(step)
            else:
                _print_step(step)
        elif isinstance(event, Finished):
            if event.end_step is not None:  # the step that chose to end the answer (its token is not text)
                end = {**_step_dict(event.end_step, event.end_step.text), "event": "end"}
                if args.json:
                    _print_json(end)
                else:
                    print(f"   end-of-sequence chosen at step {end['index']}:")
                    _print_step(end)
            if args.json:
                _print_json(
                    {
                        "event": "finished",
                        "reason": event.reason,
                        "prompt_tokens": event.prompt_tokens,
                        "generated_tokens": event.generated_tokens,
                        "text": event.text,
                        "token_ids": list(event.token_ids),
                        "mean_entropy": sum(s["entropy"] for s in steps) / len(steps) if steps else None,
                        "prompt_mode": mode,
                        "sampling": dataclasses.asdict(sampling),
                    }
                )
            else:
                print(_summary(steps, event.reason))
    return 0


# ---------------------------------------------------------------------------------------------
# tokenize


def cmd_tokenize(args: argparse.Namespace) -> int:
    from llmchat.engine.package import open_tokenizer

    if (args.text is None) == (args.file is None):
        raise CLIError("give the text either as an argument or with --file (one of them)")
    text = args.text
    if args.file is not None:  # the exact bytes: no newline translation, "\r\n" stays two characters
        try:
            text = Path(args.file).expanduser().read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise CLIError(f"no such file: {args.file}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f"cannot read {args.file}: {exc}") from None
    tokenizer = open_tokenizer(resolve_model(args.model))
    ids = tokenizer.encode(text, add_special_tokens=args.special)
    pieces = tokenizer.token_texts(ids)  # the vocabulary's own spelling: 'Ġworld', '▁world', '<0xE4>'
    texts = [tokenizer.token_text(i) for i in ids]  # what each token reads as: ' world'
    if args.json:
        _print_json({"ids": ids, "texts": texts, "tokens": pieces})
    else:
        for i, (token_id, shown, piece) in enumerate(zip(ids, texts, pieces)):
            print(f"{i:6d}  {token_id:8d}  {_shown(shown)}" + (f"  {_shown(piece)}" if args.raw_pieces else ""))
        print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# template


def _parse_var(spec: str) -> tuple[str, Any]:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise CLIError(f"--var takes NAME=JSON, got {spec!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        raise CLIError(f"--var {name}: {value!r} is not JSON (quote strings: {name}='\"text\"')") from None


def cmd_template(args: argparse.Namespace) -> int:
    from llmchat.engine.chat_template import ChatTemplates, read_special_tokens
    from llmchat.engine.errors import TemplateError
    from llmchat.engine.package import resolve_path

    folder = resolve_path(resolve_model(args.model))
    messages = _read_json_file(args.messages)
    if not isinstance(messages, list):
        raise CLIError(f"{args.messages} must hold a JSON list of messages")
    tools = _read_json_file(args.tools) if args.tools else None
    variables = dict(_parse_var(v) for v in args.var or ())
    if folder.is_file():  # a GGUF file: templates and special tokens come from its metadata
        from llmchat.engine.gguf import GGUFFile

        gguf = GGUFFile(folder)
        templates, special_tokens = gguf.chat_templates(), gguf.special_tokens()
    else:
        templates, special_tokens = ChatTemplates.from_folder(folder), read_special_tokens(folder)
    if templates is None:
        raise TemplateError(f"{folder} has no chat template")
    template = templates.get(args.name, tools=bool(tools), special_tokens=special_tokens)
    text = template.render(messages, add_generation_prompt=not args.no_generation_prompt, tools=tools, **variables)
    if args.json:
        _print_json({"text": text, "template": template.name})
    else:
        sys.stdout.write(text)
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def cmd_perplexity(args: argparse.Namespace) -> int:
    from llmchat.engine.perplexity import perplexity

    text = _read_text_file(args.file)
    model = _load(args)
    ids = model.tokenizer.encode(text, add_special_tokens=True)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise CLIError(f"{args.file}: the text is shorter than 2 tokens")
    result = perplexity(model.logits, ids, window=min(args.window, model.context_length))
    data = {
        "model": str(model.package.path),
        "file": args.file,
        "weights": model.info.packing,
        "dtype": str(model.dtype).removeprefix("torch."),
        "perplexity": round(result.perplexity, 4),
        "mean_nll": round(result.mean_nll, 6),
        "scored_tokens": result.scored_tokens,
        "windows": result.windows,
        "window": args.window,
        "seconds": round(result.seconds, 2),
    }
    if args.json:
        _print_json(data)
    else:
        print(
            f"perplexity {result.perplexity:.4f} over {result.scored_tokens} tokens "
            f"({result.windows} windows of {args.window}, {result.seconds:.1f} s); weights: {model.info.packing}"
        )
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmchat", description="Chat with local LLMs and watch inference happen.")
    parser.add_argument(
        "--model", dest="chat_model", metavar="MODEL", default=None, help="model for the chat screen (name or path)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="ID",
        help="reopen a saved conversation (default: last)",
    )
    parser.add_argument(
        "--raw",
        dest="chat_raw",
        action="store_true",
        help="completion mode: the transcript is one plain text the model continues, no chat template "
        "(the default for a base model; Alt+M switches)",
    )
    chat = parser.add_argument_group("chat screen sampling (change them live with the keys)")
    _add_sampling_options(chat, dest_prefix="chat_")
    add_engine_options(parser.add_argument_group("chat screen engine"), dest_prefix="chat_")
    parser.set_defaults(func=cmd_chat)  # bare `llmchat` opens the chat
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="answer one prompt, streaming the text")
    _add_model_options(p)
    _add_sampling_options(p)
    _add_prompt_options(p)
    p.add_argument("--top-logprobs", type=positive_int, default=5, help="alternatives recorded per token in --json")
    p.add_argument("--json", action="store_true", help="one JSON object per event (JSON lines)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "inspect",
        help="per-step next-token data of an answer: token, probability, top-k, entropy, rank",
        description=(
            "Answer one prompt and print, for every generated token, what the model predicted: the token, "
            "its raw probability and its probability under the sampling policy, its rank, the entropy of "
            "both distributions (bits), its logit, the step's time, and the top-k candidates. Decoding is "
            "greedy (temperature 0, reproducible) unless --temperature is given. Note: --top-k here is how "
            "many candidates to show per step; the sampling policy's top-k is --sample-top-k."
        ),
    )
    _add_model_options(p)
    _add_sampling_options(
        p,
        top_k_flag="--sample-top-k",
        temperature_help="sampling temperature; default 0 (greedy, reproducible) for inspect",
    )
    _add_prompt_options(p)
    p.add_argument(
        "--top-k",
        dest="candidates",
        type=positive_int,
        default=5,
        metavar="K",
        help="candidates shown per step (default 5); NOT the sampling top-k, which is --sample-top-k",
    )
    p.add_argument("--json", action="store_true", help="JSON lines: one object per step, then a 'finished' object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tokenize", help="show the token ids of a text")
    p.add_argument("model", help="model folder or .gguf file (only the tokenizer is read)")
    p.add_argument("text", nargs="?", default=None)
    p.add_argument("--file", default=None, metavar="INPUT", help="read the text from a file (exact UTF-8 bytes)")
    p.add_argument("--special", action="store_true", help="add the special tokens the tokenizer adds (BOS...)")
    p.add_argument(
        "--raw-pieces",
        action="store_true",
        help="also show each token's vocabulary piece as stored ('Ġworld', '▁world', '<0xE4>')",
    )
    p.add_argument("--json", action="store_true", help='{"ids", "texts" (readable), "tokens" (vocabulary pieces)}')
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("template", help="render a chat with the model's chat template")
    p.add_argument("model", help="folder with tokenizer_config.json (and/or chat_template.jinja/.json)")
    p.add_argument("--messages", required=True, help="JSON file with a list of {role, content} messages")
    p.add_argument("--tools", default=None, help="JSON file with a list of tool schemas")
    p.add_argument("--no-generation-prompt", action="store_true")
    p.add_argument("--var", action="append", help="extra template variable NAME=JSON (repeatable)")
    p.add_argument("--name", default=None, help="named template (default, tool_use, ...)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_template)

    p = sub.add_parser("bench", help="measure prefill and decode speed (also per turn, per context length)")
    _add_model_options(p)
    add_bench_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("perplexity", help="perplexity of a text file under a model (quality check)")
    _add_model_options(p)
    p.add_argument("--file", required=True, help="UTF-8 text to score")
    p.add_argument("--window", type=positive_int, default=512, help="tokens per scored window")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_perplexity)

    add_info_parsers(sub)
    add_models_parsers(sub)
    from llmchat.cli_chats import add_chats_parsers  # stdlib only: `chats` needs no torch

    add_chats_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad argument (one line said already, code 2), or --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func  # bare `llmchat` gets cmd_chat
    try:
        return func(args)
    except LLMChatError as exc:
        print(f"llmchat: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", EXIT_USAGE)  # 1 for a chat that crashed (tui.app.ChatCrashed)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
