"""`llmchat info` (what a model is) and `llmchat vram` (what it will cost, and what it does cost)."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict
from typing import Any

from llmchat.cli.args import DTYPES, positive_int
from llmchat.engine.generate import DEFAULT_PREFILL_CHUNK
from llmchat.models import resolve_model

MiB = 1024**2
VRAM_CONTEXTS = (2048, 8192, 32768)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def describe(package: Any, traits: Any) -> dict[str, Any]:
    """Everything `info` reports, as plain data."""
    from llmchat.engine.memory import active_parameter_count, model_context_length, parameter_count

    config = package.config
    moe = {"active_parameters": active_parameter_count(config)} if config.num_experts else {}
    return (
        moe
        | _cache_shape(config)
        | {
            "name": package.name,
            "path": str(package.path),
            "architecture": config.architecture,
            "parameters": parameter_count(config),
            "format": package.format,
            "quantization": package.quantization,
            "file_bytes": package.size_bytes,
            "context_length": model_context_length(config),
            "model_type": traits.kind,
            "capabilities": traits.labels,
            "template_variables": list(traits.template_variables),
            "chat_templates": sorted(package.templates.templates) if package.templates else [],
            "special_tokens": package.special_tokens,
            "eos_token_ids": list(package.eos_token_ids),
            "tokenizer_vocab": package.tokenizer.vocab_size,
            "generation_defaults": asdict(package.generation.sampling)
            | {"max_new_tokens": package.generation.max_new_tokens},
            "config": asdict(config),
        }
    )


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from llmchat.engine.checkpoint import check_names
    from llmchat.engine.model_type import detect
    from llmchat.engine.package import open_package

    package = open_package(resolve_model(args.model))
    check_names(package.config, package.weights.tensor_names())  # what would stop a load stops info too
    data = describe(package, detect(package.templates, package.tokenizer))
    plan = _packing_plan(package, torch.device("cpu"), torch.float32, dequantize=False)
    packing = _packing_summary(plan, package.config)
    data["cpu_weights"] = f"kept packed: {packing}" if plan else "float32 (nothing to keep packed)"
    if plan and any(layout == "int4" for layout, _ in plan.values()):
        from llmchat.engine.q4kernel import describe as describe_kernel

        data["int4_kernel"] = describe_kernel()
    if _mapped_embedding(package, plan, dequantize=False):
        data["cpu_weights"] += "; token embedding read from the file on demand"
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
        return 0
    c = package.config
    rope = f"rope {c.rope.type}, theta {c.rope.theta:g}" + (f", factor {c.rope.factor:g}" if c.rope.factor != 1 else "")
    window = f", sliding window {c.sliding_window} on {sum(c.sliding_layers)} layers" if c.sliding_window else ""
    active = f" ({data['active_parameters'] / 1e6:.1f}M active per token)" if "active_parameters" in data else ""
    mlp = f"MLP {c.intermediate_size}"
    if c.num_experts:
        mlp = f"{c.num_experts} experts of {c.moe_intermediate_size} ({c.num_experts_per_tok} per token) on "
        mlp += f"{sum(c.moe_layers)} layers" + (f", dense MLP {c.intermediate_size}" if not all(c.moe_layers) else "")
        mlp += f", shared expert {c.shared_expert_intermediate_size}" if c.shared_expert_intermediate_size else ""
    lines = [
        f"{data['name']}: {c.architecture}, {data['parameters'] / 1e6:.1f}M parameters{active}, "
        f"{data['model_type']} model" + (f" ({', '.join(data['capabilities'])})" if data["capabilities"] else ""),
        f"  file        {data['format']}, {data['quantization']}, {data['file_bytes'] / MiB:.1f} MiB",
        f"  on CPU      {data['cpu_weights']}",
        *([f"  kernel      {data['int4_kernel']}"] if "int4_kernel" in data else []),
        f"  shape       {c.num_layers} layers, hidden {c.hidden_size}, {mlp}, "
        f"heads {c.num_heads} (KV {c.num_kv_heads}), head_dim {c.head_dim}",
        f"  context     {data['context_length']} tokens, {rope}{window}",
        *([f"  cache       {_cache_note(data, c)}"] if _cache_note(data, c) else []),
        f"  vocab       {c.vocab_size} (tokenizer {data['tokenizer_vocab']}), eos ids {data['eos_token_ids']}",
        f"  special     {', '.join(f'{k}={v!r}' for k, v in data['special_tokens'].items()) or 'none'}",
        f"  templates   {', '.join(data['chat_templates']) or 'none'}"
        + (f"; variables: {', '.join(data['template_variables'])}" if data["template_variables"] else ""),
        "  defaults    " + ", ".join(f"{k} {v}" for k, v in data["generation_defaults"].items() if v is not None),
    ]
    print("\n".join(lines))
    return 0


def _contexts(args: argparse.Namespace, model_max: int) -> list[int]:
    if args.context:
        return sorted(set(args.context))
    return sorted({n for n in VRAM_CONTEXTS if n < model_max} | {model_max})


def _measure(args: argparse.Namespace, context: int) -> dict[str, Any]:
    """Load the model with a `context`-token cache, prefill it full, and read the memory used."""
    import torch

    from llmchat.engine import SamplingParams, load
    from llmchat.engine.events import Finished
    from llmchat.engine.memory import peak_rss_bytes, rss_bytes

    model = load(
        resolve_model(args.model),
        device=args.device,
        dtype=args.dtype,
        context_length=context,
        prefill_chunk=args.prefill_chunk,
        packed=False if args.dequantize else None,
    )
    rng = random.Random(0)
    prompt = [rng.randrange(model.tokenizer.vocab_size) for _ in range(context)]
    *_, done = model.generate(prompt, sampling=SamplingParams(temperature=0), max_new_tokens=1, stop_on_eos=False)
    assert isinstance(done, Finished)
    tensors = model.weights_bytes() + model.cache.nbytes
    if model.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(model.device)
        return {"kind": "VRAM", "peak": peak, "tensors": tensors, "prefilled": done.prefilled_tokens}
    return {
        "kind": "RAM",
        "peak": peak_rss_bytes(),
        "now": rss_bytes(),
        "tensors": tensors,
        "prefilled": done.prefilled_tokens,
    }


def _stored_weights(package: Any) -> dict[str, Any]:
    """What the file holds, by tensor type (GGUF: the quant types), next to what loading makes of it."""
    file = getattr(package.weights, "file", None)
    by_type: dict[str, int] = file.tensor_bytes_by_type() if file is not None else {}
    return {
        "format": package.format,
        "quantization": package.quantization,
        "bytes": sum(by_type.values()) or package.size_bytes,
        "bytes_by_type": by_type,
    }


def _packing_plan(package: Any, device: Any, dtype: Any, dequantize: bool) -> dict[str, Any]:
    """What `load` will keep packed for this package on this device (see engine/packed.py)."""
    from llmchat.engine.errors import ModelLoadError
    from llmchat.engine.runtime import packing_for

    try:
        return packing_for(package, device, dtype, packed=False if dequantize else None)
    except ModelLoadError:  # a vocab-only GGUF: no weights to pack
        return {}


def _mapped_embedding(package: Any, plan: dict[str, Any], dequantize: bool) -> int:
    """Bytes of the file `load` will read the token embedding from on demand (0: it is loaded)."""
    from llmchat.engine.runtime import mapped_embedding_bytes

    return mapped_embedding_bytes(package, plan, packed=False if dequantize else None)


def _packing_summary(plan: dict[str, Any], config: Any) -> str:
    """The same words `load` reports (LoadInfo.packing), predicted from the plan."""
    from llmchat.engine.packed import PackingReport
    from llmchat.engine.runtime import expert_stacks

    return PackingReport.of_plan(plan, expert_stacks(config)).summary()


def _sliding_note(config: Any, rows: list[dict[str, Any]]) -> str:
    """What the sliding-window layers keep, in words ('' for a model without them)."""
    from llmchat.engine.kv_cache import RING_SLACK

    windows = [config.layer_window(i) for i in range(config.num_layers)]
    sliding = sum(w is not None for w in windows)
    if not sliding:
        return ""
    window = max(w for w in windows if w is not None)
    least = ", ".join(f"{row['context']}: {row['kv_cache_windowed'] / MiB:.1f}" for row in rows)
    return (
        f"(sliding window {window} on {sliding} of {config.num_layers} layers: each keeps a ring of its last "
        f"{window} + {RING_SLACK} positions (rewinding up to {RING_SLACK + 1} reuses the cache), not the whole "
        f"context; the window alone would be {least} MiB)"
    )


def _cache_shape(config: Any) -> dict[str, Any]:
    """What the cache holds per layer: keys and values growing with the context in attention layers,
    a fixed state in a hybrid's recurrent ones (float32 bytes; `layer_kinds` only for a hybrid)."""
    import torch

    from llmchat.engine.memory import kv_bytes_per_token, recurrent_state_bytes

    kinds = [config.layer_kind(i) for i in range(config.num_layers)]
    data: dict[str, Any] = {"kv_bytes_per_token": kv_bytes_per_token(config, torch.float32)}
    if set(kinds) != {"attention"}:
        data |= {"layer_kinds": kinds, "recurrent_state_bytes": recurrent_state_bytes(config, torch.float32)}
    return data


def _cache_note(data: dict[str, Any], config: Any) -> str:
    """The cache in words: '' for a model whose every layer attends."""
    kinds = data.get("layer_kinds")
    if not kinds:
        return ""
    names = {"conv": f"short-convolution (kernel {config.conv_kernel})", "linear_attention": "Gated DeltaNet"}
    names["mamba"] = f"Mamba-2 (state {config.ssm_state_size})"
    recurrent = [names[kind] for kind in kinds if kind != "attention"]
    attending = len(kinds) - len(recurrent)
    described = ", ".join(f"{recurrent.count(name)} {name}" for name in dict.fromkeys(recurrent))
    return (
        f"{attending} attention layers keep keys and values ({data['kv_bytes_per_token'] / 1024:.1f} KiB per token "
        f"in float32); {described} layers keep a fixed state of {data['recurrent_state_bytes'] / 1024:.1f} KiB "
        "in all, whatever the context"
    )


def _experts_note(config: Any) -> str:
    """A mixture of experts in words: all experts are held, a token runs k of them ('' for a dense model)."""
    from llmchat.engine.memory import active_parameter_count, parameter_count

    if not config.num_experts:
        return ""
    active, total = active_parameter_count(config) / 1e6, parameter_count(config) / 1e6
    return (
        f"{config.num_experts} experts on {sum(config.moe_layers)} layers, all held; a token runs "
        f"{config.num_experts_per_tok} of them: {active:.1f}M of {total:.1f}M parameters"
    )


def cmd_vram(args: argparse.Namespace) -> int:
    from llmchat.engine.memory import active_parameter_count, estimate, model_context_length, rss_bytes
    from llmchat.engine.package import open_package
    from llmchat.engine.runtime import resolve_device, resolve_dtype

    package = open_package(resolve_model(args.model))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    plan = _packing_plan(package, device, dtype, args.dequantize)
    mapped = _mapped_embedding(package, plan, args.dequantize)
    # This process has imported torch and read the package (tokenizer, vocabulary) and holds no
    # weights yet: its resident memory is the runtime a loaded model sits on (it differs between
    # installs by tens of MB, which matters next to a 140 MB model).
    runtime = rss_bytes() if device.type == "cpu" else None
    kv_dtype = resolve_dtype(args.kv_dtype, device) if args.kv_dtype else dtype
    rows = []
    for context in _contexts(args, model_context_length(package.config)):
        bill = estimate(
            package.config,
            dtype,
            context,
            kv_dtype=kv_dtype,
            prefill_chunk=args.prefill_chunk,
            device_type=device.type,
            packed=plan,
            runtime=runtime,
            mapped_embedding=mapped,
        )
        rows.append({"context": context} | asdict(bill) | {"total": bill.total})
    result: dict[str, Any] = {
        "model": str(package.path),
        "device": str(device),
        "dtype": _dtype_name(dtype),
        "kv_dtype": _dtype_name(kv_dtype),
        "stored": _stored_weights(package),
        "weights": _packing_summary(plan, package.config),
        "estimates": rows,
        **_cache_shape(package.config),
    }
    if package.config.num_experts:
        result |= {
            "experts": package.config.num_experts,
            "experts_per_token": package.config.num_experts_per_tok,
            "active_parameters": active_parameter_count(package.config),
        }
    if args.measure:
        measured = _measure(args, rows[0]["context"])
        predicted = rows[0]["total"]
        measured["predicted_total"] = predicted
        measured["error"] = round((predicted - measured["peak"]) / measured["peak"], 4)
        result["measured"] = measured
    if args.json:
        print(json.dumps(result))
        return 0
    stored = result["stored"]
    if stored["bytes_by_type"]:
        types = ", ".join(f"{t} {n / MiB:.1f}" for t, n in stored["bytes_by_type"].items())
        held = f"kept packed: {result['weights']}" if plan else f"dequantized to {result['dtype']} at load"
        file = f"{stored['format']} {stored['quantization']}, tensors {stored['bytes'] / MiB:.1f} MiB ({types})"
        print(f"file: {file}; {held}")
    print(f"{package.name} on {device}, weights {result['dtype']}, KV cache {result['kv_dtype']} (MiB)")
    header = (
        f"{'context':>8} {'weights':>9} {'KV cache':>9} {'activations':>12} {'runtime':>8} {'loading':>8} "
        f"{'peak':>9}  peak while"
    )
    print(header)
    for row in rows:
        serving = row["kv_cache"] + row["activations"] >= row["load_transient"]
        print(
            f"{row['context']:>8} {row['weights'] / MiB:>9.1f} {row['kv_cache'] / MiB:>9.1f} "
            f"{row['activations'] / MiB:>12.1f} {row['runtime'] / MiB:>8.1f} {row['load_transient'] / MiB:>8.1f} "
            f"{row['total'] / MiB:>9.1f}  {'serving' if serving else 'loading'}"
        )
    print(
        "(peak = weights + runtime + the larger of KV cache + activations, while serving, and loading: the "
        "largest matrix read as float32 and its packed or transposed copy, before the KV cache fills)"
    )
    sliding = _sliding_note(package.config, rows)
    if sliding:
        print(sliding)
    hybrid = _cache_note(_cache_shape(package.config), package.config)
    if hybrid:
        print(f"(KV cache column: {hybrid})")
    experts = _experts_note(package.config)
    if experts:
        print(f"(weights column: {experts})")
    if mapped:
        print(
            f"(token embedding: {mapped / MiB:.1f} MiB of the file, mapped and read by rows on demand: counted "
            "as 0, as none of it stays resident)"
        )
    if args.measure:
        m = result["measured"]
        print(
            f"measured at {rows[0]['context']} tokens: peak {m['kind']} {m['peak'] / MiB:.1f} MiB "
            f"(tensors {m['tensors'] / MiB:.1f} MiB) vs predicted {m['predicted_total'] / MiB:.1f} MiB: "
            f"{m['error'] * 100:+.1f}%"
        )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="describe a model without loading its weights")
    p.add_argument("model", nargs="?", default=None, help="registered name, demo, or path (default: the default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("vram", help="the memory bill of a model: weights, KV cache, activations, runtime")
    p.add_argument("model", nargs="?", default=None, help="registered name, demo, or path (default: the default)")
    p.add_argument("--context", type=positive_int, action="append", help="context length (repeatable; default: a few)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype the weights run in")
    p.add_argument("--kv-dtype", default=None, choices=DTYPES, help="dtype of the KV cache (default: the weights')")
    p.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK)
    p.add_argument("--measure", action="store_true", help="load, prefill the first context, compare with the bill")
    p.add_argument("--dequantize", action="store_true", help="the bill with quantized weights dequantized at load")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vram)
