"""`llmchat bench`: prefill and decode speed, per turn of a conversation, and per context length.

Three measurements, all greedy over random prompt tokens (no special tokens), after one warm-up:
  default     one prompt of --prompt-tokens, --gen-tokens generated; the best of --repeat.
  --turns N   a synthetic conversation: each turn appends --turn-tokens new prompt tokens to the
              whole history (earlier prompts and answers) and generates --gen-tokens. The KV
              cache's prefix reuse means each turn prefills only its new tokens, so time to first
              token should stay flat as the history grows.
  --contexts  decode tok/s with a cache already holding N tokens, for each N: what long chats cost.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from llmchat.cli.args import non_negative_int, positive_int, positive_int_list, whole_number
from llmchat.cli.common import CLIError, add_model_options, load_model, print_json


def add_bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=positive_int, default=512)
    p.add_argument("--gen-tokens", type=positive_int, default=128)
    p.add_argument("--repeat", type=positive_int, default=1, help="timed runs (the best is reported)")
    p.add_argument("--seed", type=whole_number, default=0)
    p.add_argument("--turns", type=non_negative_int, default=0, help="also run a synthetic conversation of N turns")
    p.add_argument("--turn-tokens", type=positive_int, default=64, help="new prompt tokens per turn (with --turns)")
    p.add_argument(
        "--contexts",
        type=positive_int_list,
        default=[],
        metavar="N,N,...",
        help="also measure decode at these context lengths",
    )
    p.add_argument("--context-gen-tokens", type=positive_int, default=32, help="tokens decoded per --contexts length")
    p.add_argument("--json", action="store_true")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from llmchat.engine import SamplingParams, q4kernel
    from llmchat.engine.events import Finished
    from llmchat.engine.memory import peak_rss_bytes

    contexts: list[int] = args.contexts
    needed = max(
        args.prompt_tokens + args.gen_tokens,
        args.turns * (args.turn_tokens + args.gen_tokens),
        (contexts[-1] + args.context_gen_tokens) if contexts else 0,
    )
    if args.context is None:
        args.context = needed  # just what the runs need: a smaller cache loads faster
    model = load_model(args)
    if needed > model.context_length:
        raise CLIError(f"the runs need {needed} tokens of context, the model has {model.context_length}; use --context")
    rng = random.Random(args.seed)
    special = model.tokenizer.special_ids()
    vocab = [i for i in range(min(model.tokenizer.vocab_size, model.config.vocab_size)) if i not in special]
    greedy = SamplingParams(temperature=0)

    def tokens(n: int) -> list[int]:
        return [rng.choice(vocab) for _ in range(n)]

    def generate(prompt: list[int], gen_tokens: int) -> Finished:
        *_, done = model.generate(prompt, sampling=greedy, max_new_tokens=gen_tokens, stop_on_eos=False)
        assert isinstance(done, Finished)
        return done

    def one_run(prompt_tokens: int, gen_tokens: int) -> Finished:
        model.reset()
        return generate(tokens(prompt_tokens), gen_tokens)

    one_run(min(32, args.prompt_tokens), 4)  # warm-up: first-call allocations and kernel selection
    runs = [one_run(args.prompt_tokens, args.gen_tokens) for _ in range(args.repeat)]
    device = model.device
    result: dict[str, Any] = {
        "model": str(model.package.path),
        "architecture": model.config.architecture,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prefill_tok_s": round(max(r.prefill_tokens_per_second for r in runs), 2),
        "decode_tok_s": round(max(r.decode_tokens_per_second for r in runs), 2),
        "ttft_s": round(min(r.ttft_seconds for r in runs), 4),
        "weights": model.info.packing,
        "int4_kernel": q4kernel.describe(),
        "weights_bytes": model.weights_bytes(),
        "kv_cache_bytes": model.cache.nbytes,
        "kv_bytes_per_token": model.cache.bytes_per_token,
        **_shape_figures(model),
        "load_s": round(model.info.seconds, 3),
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        **_thread_figures(model),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "repeat": args.repeat,
    }
    if args.turns:
        result["turns"] = _conversation(model, args.turns, args.turn_tokens, args.gen_tokens, tokens, generate)
    if contexts:
        result["contexts"] = [_at_context(model, n, args.context_gen_tokens, tokens, generate) for n in contexts]
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    if args.json:
        print_json(result)
    else:
        _print_table(result)
    return 0


def _thread_figures(model: Any) -> dict[str, Any]:
    """The thread count asked for, the one decode ended on, and how often it switched (engine/threads.py)."""
    import torch

    governor = model.generator.threads
    if governor is None:
        return {"threads": torch.get_num_threads()}
    return {"threads": governor.configured, "decode_threads": governor.threads, "thread_switches": governor.switches}


def _shape_figures(model: Any) -> dict[str, Any]:
    """What a mixture of experts runs per token, and what a hybrid's recurrent layers hold, fixed."""
    from llmchat.engine.memory import active_parameter_count, parameter_count

    config, cache = model.config, model.cache
    figures: dict[str, Any] = {}
    if config.num_experts:
        figures["experts"] = f"{config.num_experts}, {config.num_experts_per_tok} per token"
        figures["active_parameters"] = f"{active_parameter_count(config):,} of {parameter_count(config):,}"
    if cache.recurrent_layers:
        figures["recurrent_layers"] = len(cache.recurrent_layers)
        figures["recurrent_state_bytes"] = cache.state_bytes
    return figures


def _conversation(model: Any, turns: int, turn_tokens: int, gen_tokens: int, tokens: Any, generate: Any) -> list:
    """Each turn: history + new prompt tokens, generate; the history keeps the answer."""
    model.reset()
    history: list[int] = []
    rows = []
    for turn in range(1, turns + 1):
        history += tokens(turn_tokens)
        done = generate(history, gen_tokens)
        rows.append(
            {
                "turn": turn,
                "context_tokens": len(history),
                "prefilled_tokens": done.prefilled_tokens,
                "reused_tokens": done.reused_tokens,
                "ttft_s": round(done.ttft_seconds, 4),
                "decode_tok_s": round(done.decode_tokens_per_second, 2),
            }
        )
        history += model.cache.tokens[len(history) :]  # the answer, as the cache holds it
    return rows


def _at_context(model: Any, context: int, gen_tokens: int, tokens: Any, generate: Any) -> dict[str, Any]:
    """Decode speed once the cache holds `context` tokens."""
    model.reset()
    done = generate(tokens(context), gen_tokens)
    return {
        "context_tokens": context,
        "decode_tok_s": round(done.decode_tokens_per_second, 2),
        "prefill_tok_s": round(done.prefill_tokens_per_second, 2),
    }


def _print_table(result: dict[str, Any]) -> None:
    plain = {k: v for k, v in result.items() if k not in ("turns", "contexts")}
    width = max(len(k) for k in plain)
    for key, value in plain.items():
        print(f"{key:<{width}}  {value}")
    if "turns" in result:
        print("\nturn  context  prefilled  reused  TTFT s  decode tok/s")
        for row in result["turns"]:
            print(
                f"{row['turn']:>4}  {row['context_tokens']:>7}  {row['prefilled_tokens']:>9}  "
                f"{row['reused_tokens']:>6}  {row['ttft_s']:>6.3f}  {row['decode_tok_s']:>12.1f}"
            )
    if "contexts" in result:
        print("\ncontext  decode tok/s  prefill tok/s")
        for row in result["contexts"]:
            print(f"{row['context_tokens']:>7}  {row['decode_tok_s']:>12.1f}  {row['prefill_tok_s']:>13.1f}")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure prefill and decode speed (also per turn, per context length)")
    add_model_options(p)
    add_bench_options(p)
    p.set_defaults(func=cmd_bench)
