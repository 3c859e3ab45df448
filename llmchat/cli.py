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

from llmchat.cli_bench import add_bench_options, cmd_bench
from llmchat.cli_info import add_info_parsers
from llmchat.cli_models import add_models_parsers, cmd_chat
from llmchat.engine.errors import LLMChatError
from llmchat.engine.generate import DEFAULT_PREFILL_CHUNK
from llmchat.models import resolve_model
from llmchat.paths import cache_dir

EXIT_USAGE = 2


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
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--context", type=int, default=None, help="context length (default: the model's, memory-capped)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="tokens per prefill chunk")
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="dequantize a GGUF's quantized weights to float at load (the exact reference; slower)",
    )


def _add_sampling_options(
    p: argparse.ArgumentParser, *, top_k_flag: str = "--top-k", temperature_help: str = "0 = greedy"
) -> None:
    """The sampling policy's knobs (dest names match SamplingParams; see `_sampling`).

    `top_k_flag`: how the sampling top-k is spelled, for a subcommand whose `--top-k` means
    something else (`inspect`: candidates shown); its dest stays `top_k`.
    """
    p.add_argument("--temperature", type=float, default=None, help=temperature_help)
    p.add_argument(
        top_k_flag,
        dest="top_k",
        type=int,
        default=None,
        help=None if top_k_flag == "--top-k" else "sampling top-k: keep only the K likeliest tokens (0 = off)",
    )
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)


def _load(args: argparse.Namespace):  # -> LoadedModel (imported lazily: torch is slow to import)
    import torch

    from llmchat.engine import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(
        resolve_model(args.model),
        device=args.device,
        dtype=args.dtype,
        context_length=args.context,
        prefill_chunk=args.prefill_chunk,
        packed=False if args.dequantize else None,
        cache_dir=cache_dir() / "packed",
    )


def _add_prompt_options(p: argparse.ArgumentParser) -> None:
    """The prompt of a one-shot answer (`run`, `inspect`); `_prompt_ids` turns them into tokens."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--raw", action="store_true", help="skip the chat template: the prompt is the whole input")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _prompt_ids(model: Any, args: argparse.Namespace) -> list[int]:
    """Token ids of `--prompt`: through the chat template (with `--system`), or as is with `--raw`."""
    if args.raw:
        if args.system:
            raise CLIError("--system needs the chat template; drop --raw")
        return list(model.tokenizer.encode(args.prompt, add_special_tokens=True))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    return list(model.tokenizer.encode(model.template.render(messages, add_generation_prompt=True)))


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
    ids = _prompt_ids(model, args)
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

    if args.candidates < 1:
        raise CLIError(f"--top-k (candidates shown per step) must be at least 1, got {args.candidates}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = _load(args)
    ids = _prompt_ids(model, args)
    sampling = _sampling(args, model.default_sampling)
    if args.temperature is None:  # reproducible by default: the policy's other knobs stay as given
        sampling = sampling.replace(temperature=0.0)
    if not args.json:
        print(f"model {model.package.path} · prompt {len(ids)} tokens · sampling: {_sampling_words(sampling)}")
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
    tokens = tokenizer.token_texts(ids)
    if args.json:
        _print_json({"ids": ids, "tokens": tokens})
    else:
        for i, (token_id, token) in enumerate(zip(ids, tokens)):
            print(f"{i:6d}  {token_id:8d}  {token!r}")
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
    parser = argparse.ArgumentParser(prog="llmchat", description="Chat with local LLMs and watch inference happen.")
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
    chat = parser.add_argument_group("chat screen sampling (change them live with the keys)")
    chat.add_argument("--temperature", dest="chat_temperature", type=float, default=None, help="0 = greedy")
    chat.add_argument("--top-p", dest="chat_top_p", type=float, default=None)
    chat.add_argument("--top-k", dest="chat_top_k", type=int, default=None)
    chat.add_argument("--seed", dest="chat_seed", type=int, default=None)
    chat.add_argument(
        "--max-new-tokens", dest="chat_max_new_tokens", type=int, default=None, help="answer length limit"
    )
    parser.set_defaults(func=cmd_chat)  # bare `llmchat` opens the chat
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="answer one prompt, streaming the text")
    _add_model_options(p)
    _add_sampling_options(p)
    _add_prompt_options(p)
    p.add_argument("--top-logprobs", type=int, default=5, help="alternatives recorded per token in --json")
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
        type=int,
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
    p.add_argument("--json", action="store_true")
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
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_perplexity)

    add_info_parsers(sub)
    add_models_parsers(sub)
    from llmchat.cli_chats import add_chats_parsers  # stdlib only: `chats` needs no torch

    add_chats_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func  # bare `llmchat` gets cmd_chat
    try:
        return func(args)
    except LLMChatError as exc:
        print(f"llmchat: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
