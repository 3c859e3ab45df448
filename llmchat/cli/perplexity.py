"""`llmchat perplexity`: the perplexity of a text file under a model (a quality check)."""

from __future__ import annotations

import argparse
from typing import Any

from llmchat.cli.args import positive_int
from llmchat.cli.common import CLIError, add_model_options, load_model, print_json, read_text_file


def cmd_perplexity(args: argparse.Namespace) -> int:
    from llmchat.engine.perplexity import perplexity

    text = read_text_file(args.file)
    model = load_model(args)
    ids = model.tokenizer.encode(text, add_special_tokens=True)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise CLIError(f"{args.file}: the text is shorter than 2 tokens")
    result = perplexity(
        lambda window: model.logits(window, rows=args.rows), ids, window=min(args.window, model.context_length)
    )
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
        "rows": args.rows,
        "seconds": round(result.seconds, 2),
    }
    if args.json:
        print_json(data)
    else:
        print(
            f"perplexity {result.perplexity:.4f} over {result.scored_tokens} tokens "
            f"({result.windows} windows of {args.window}, {result.seconds:.1f} s); weights: {model.info.packing}"
        )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file under a model (quality check)")
    add_model_options(p)
    p.add_argument("--file", required=True, help="UTF-8 text to score")
    p.add_argument("--window", type=positive_int, default=512, help="tokens per scored window")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens")
    p.add_argument(
        "--rows",
        type=positive_int,
        default=None,
        help="tokens per forward pass (default: the whole window); 1 scores the decode path token by token",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_perplexity)
