"""Mixture-of-experts models (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE) against transformers, from folders and GGUF files.

Tiny random models (tiny_models.MOE_KINDS: 8 experts, 2 per token) built with transformers' own
classes: the router picks many experts across a sequence, the float32 logits of a 40-token input
agree within TOL, 20 greedy tokens (prefill, then KV-cached decoding) are those of `generate`, and
the same holds for the GGUF export. Then the loading details: transformers 5's fused expert
parameters, which layers are sparse, quantized experts (kept packed, one packed layer per expert,
also through the packed cache and the memory bill), and the errors for
missing expert tensors and a GGUF whose expert_count disagrees with its tensors. OLMoE's q/k norms
span the whole projection and its q/k/v are clipped; Qwen2-MoE adds a gated shared expert.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

import llmchat
from llmchat.engine.config import from_hf_config
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.memory import module_bytes, weight_bytes
from llmchat.engine.moe import MoE, PackedExperts
from llmchat.engine.packed import PackedLinear
from tests.gguf_export import export_gguf
from tests.hf_reference import hf_greedy, hf_logits, hf_model, llmchat_greedy, random_ids, vocab_size
from tests.tiny_models import MOE_KINDS

TOL = 1e-4
LOGITS_LEN = 40  # beyond Mixtral's window of 8
PROMPT_LEN = 12
NEW_TOKENS = 20

TinyModelFactory = Callable[..., Path]
hf_logging.disable_progress_bar()


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(folder: Path, n: int, seed: int) -> list[int]:
    return random_ids(n, vocab_size(folder), seed)


_greedy = llmchat_greedy


def _moe_blocks(model: Any) -> list[MoE]:
    return [block.mlp for block in model.model.layers if isinstance(block.mlp, MoE)]


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_the_router_picks_many_experts(kind: str, tiny_model: TinyModelFactory) -> None:
    """Self-check of the tiny models: in transformers, tokens of one sequence go to different experts."""
    model = hf_model(tiny_model(kind))
    chosen: list[set[int]] = []

    def record(module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
        chosen.append(set(output[2].reshape(-1).tolist()))  # (logits, weights, expert ids)

    routers = [m for name, m in model.named_modules() if name.endswith(".gate") and hasattr(m, "top_k")]
    assert routers, f"{kind}: no router found"
    for router in routers:
        router.register_forward_hook(record)
    hf_logits(model, _ids(tiny_model(kind), LOGITS_LEN, seed=1))
    assert len(chosen) == len(routers)
    assert max(len(c) for c in chosen) > 2, f"{kind}: experts chosen per layer {chosen}"


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_logits_match_transformers(kind: str, tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]) -> None:
    """40 tokens, float32: the folder and its F32 GGUF give transformers' logits."""
    folder = tiny_model(kind)
    ids = _ids(folder, LOGITS_LEN, seed=1)
    expected = hf_logits(hf_model(folder), ids)
    assert expected.std() > 1.0, "logits too flat for greedy parity"
    for source in (folder, tiny_gguf(kind)):
        got = llmchat.load(source, device="cpu", dtype="float32", packed=False).logits(ids)
        assert got.shape == expected.shape
        diff = (got - expected).abs().max().item()
        assert diff <= TOL, f"{kind} from {source.name}: max |logit diff| {diff:.3g} > {TOL}"


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_greedy_matches_transformers(kind: str, tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]) -> None:
    """A 12-token prefill, then 20 KV-cached decoding steps: transformers' greedy tokens."""
    folder = tiny_model(kind)
    prompt = _ids(folder, PROMPT_LEN, seed=2)
    expected = hf_greedy(hf_model(folder), prompt, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    for source in (folder, tiny_gguf(kind)):
        got = _greedy(llmchat.load(source, device="cpu", dtype="float32", packed=False), prompt, NEW_TOKENS)
        assert got == expected, f"{kind} from {source.name}: {got} != {expected}"


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_decoding_runs_only_the_chosen_experts(
    kind: str, tiny_model: TinyModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One token runs its k experts; a prefill runs each expert that got tokens once, over all of them.
    A shared expert (Qwen2-MoE) runs once per block over all the tokens."""
    model = llmchat.load(tiny_model(kind), device="cpu", dtype="float32")
    calls: list[tuple[int, int, int]] = []  # (block, expert, rows)
    original = MoE.expert

    def counting(self: MoE, x: torch.Tensor, index: int) -> torch.Tensor:
        calls.append((id(self), index, x.shape[0]))
        return original(self, x, index)

    monkeypatch.setattr(MoE, "expert", counting)
    shared_rows: list[int] = []
    for block in _moe_blocks(model):
        if block.shared is not None:
            block.shared.register_forward_hook(lambda module, args, out: shared_rows.append(args[0].shape[0]))
    ids = _ids(tiny_model(kind), 16, seed=5)
    model.logits(ids)
    layers = len(_moe_blocks(model))
    assert sum(rows for *_, rows in calls) == layers * len(ids) * 2  # every (token, choice) pair once
    assert len({(block, expert) for block, expert, _ in calls}) == len(calls)  # each expert once per layer
    assert shared_rows == ([len(ids)] * layers if kind == "qwen2-moe" else [])
    calls.clear()
    shared_rows.clear()
    model.logits(ids[:1])
    assert len(calls) == layers * 2 and all(rows == 1 for *_, rows in calls)
    assert shared_rows == ([1] * layers if kind == "qwen2-moe" else [])


def test_fused_expert_parameters_load(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    """A checkpoint of transformers 5's module names (experts fused into 3D gate_up_proj/down_proj,
    Mixtral's block_sparse_moe as mlp) loads to the same logits as the per-expert one."""
    for kind in ("qwen3-moe", "mixtral", "olmoe", "qwen2-moe"):
        folder = tiny_model(kind)
        fused = tmp_path / kind
        shutil.copytree(folder, fused, ignore=shutil.ignore_patterns("*.safetensors*"))
        state = {k: v.contiguous() for k, v in hf_model(folder).state_dict().items()}
        assert any(k.endswith("mlp.experts.gate_up_proj") and v.dim() == 3 for k, v in state.items())
        save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
        ids = _ids(folder, LOGITS_LEN, seed=1)
        reference = llmchat.load(folder, device="cpu", dtype="float32").logits(ids)
        assert torch.equal(llmchat.load(fused, device="cpu", dtype="float32").logits(ids), reference)


def test_config_says_which_layers_are_sparse(tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]) -> None:
    """mlp_only_layers and decoder_sparse_step (Qwen3-MoE), every layer (Mixtral); the GGUF agrees."""
    expected = {
        "qwen3-moe": ((True, False, True), False, None),
        "qwen3-moe-step": ((False, True, False), True, None),
        "mixtral": ((True, True), True, 8),
        "olmoe": ((True, True), False, None),
        "qwen2-moe": ((True, False, True), False, None),
    }
    for kind, (layers, renormalize, window) in expected.items():
        for source in (tiny_model(kind), tiny_gguf(kind)):
            config = llmchat.load(source, device="cpu", dtype="float32").config
            assert config.num_experts == 8 and config.num_experts_per_tok == 2, source
            assert config.moe_layers == layers and config.norm_topk_prob is renormalize, source
            assert config.sliding_window == window, source
    for source in (tiny_model("olmoe"), tiny_gguf("olmoe")):
        config = llmchat.load(source, device="cpu", dtype="float32").config
        assert config.qk_norm and config.qk_norm_whole and config.clip_qkv == 2.0, source
        assert config.moe_intermediate_size == 32 and config.shared_expert_intermediate_size == 0, source
    for source in (tiny_model("qwen2-moe"), tiny_gguf("qwen2-moe")):
        config = llmchat.load(source, device="cpu", dtype="float32").config
        assert config.qkv_bias and not config.o_bias and not config.qk_norm and config.clip_qkv is None, source
        assert (config.moe_intermediate_size, config.shared_expert_intermediate_size) == (32, 64), source
        assert config.intermediate_size == 128, source  # the dense layer's
    base = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128}
    base |= {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10, "moe_intermediate_size": 32}
    with pytest.raises(ModelLoadError, match="num_experts"):
        from_hf_config(base)
    with pytest.raises(ModelLoadError, match="num_experts_per_tok 9"):
        from_hf_config({**base, "num_experts": 8, "num_experts_per_tok": 9})


@pytest.mark.parametrize(("qtype", "layout"), [("Q4_0", "int4"), ("Q8_0", "int8")])
def test_quantized_experts_stay_packed(
    qtype: str, layout: str, tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]
) -> None:
    """A quantized MoE GGUF: every expert is a packed layer (Q4_0 int4, Q8_0 int8) and the router stays
    float; the packed model follows the float one (the same file dequantized)."""
    kind = "qwen2-moe"
    names = {"int4": "int4 (groups of 32)", "int8": "int8 (a scale per row), requantized"}
    path = tiny_gguf(kind, gguf.GGMLQuantizationType[qtype])
    experts = [t for t in gguf.GGUFReader(path).tensors if t.name.endswith("_exps.weight")]
    assert experts and all(t.tensor_type.name == qtype for t in experts)
    packed = llmchat.load(path, device="cpu", dtype="float32")
    plain = llmchat.load(path, device="cpu", dtype="float32", packed=False)
    blocks = _moe_blocks(packed)
    stacks = [name for name in packed.info.plan if name.endswith("_exps")]
    assert len(stacks) == 2 * len(blocks) and all(packed.info.plan[s][0] == layout for s in stacks)
    for block in blocks:
        for stack in (block.gate_up_exps, block.down_exps):
            assert isinstance(stack, PackedExperts) and len(stack) == 8
            assert all(isinstance(e, PackedLinear) and e.layout == layout for e in stack.experts)
        assert block.router.weight.dtype == torch.float32
    assert f"{qtype} experts → {names[layout]} ×{2 * 8 * len(blocks)}" in packed.info.packing
    ids = _ids(tiny_model(kind), LOGITS_LEN, seed=1)
    ours, theirs = plain.logits(ids), packed.logits(ids)
    # per position: close, except where rounding flips a near-tie of the router (then another expert runs)
    off = (theirs - ours).abs().amax(-1) / ours.abs().max()
    assert off.median().item() < 0.03 and (off < 0.1).float().mean().item() >= 0.9, off
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"packed argmax agrees on {agree:.0%} of positions"


@pytest.mark.parametrize("rows", [1, 5, 300])  # decoding, a short prefill (packed kernels), a long one (dequantized)
def test_a_packed_block_computes_the_float_block_of_its_own_weights(rows: int, tiny_gguf: Callable[..., Path]) -> None:
    """The packed experts give what the float stacks of their own (dequantized) weights give, up to the
    bfloat16 activations of the packed kernels, routing included."""
    model = llmchat.load(tiny_gguf("qwen3-moe", gguf.GGMLQuantizationType.Q4_0), device="cpu", dtype="float32")
    block = _moe_blocks(model)[0]
    reference = copy.deepcopy(block)
    for name in ("gate_up_exps", "down_exps"):
        stack = torch.stack([layer.dequantized() for layer in getattr(block, name).experts])  # [experts, out, in]
        setattr(reference, name, torch.nn.Parameter(stack.transpose(1, 2).contiguous() if block.transposed else stack))
    x = torch.randn(
        rows, block.router.weight.shape[0 if block.transposed else 1], generator=torch.Generator().manual_seed(3)
    )
    expected = reference(x)
    error = (block(x) - expected).abs().max().item()
    assert error < 2e-2 * expected.abs().max().item(), f"{rows} rows: off by {error}"


@pytest.mark.parametrize("kind", ["qwen3-moe", "qwen2-moe"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_a_packed_decoding_step_computes_the_per_expert_path(
    kind: str, qtype: str, tiny_gguf: Callable[..., Path]
) -> None:
    """A packed block's decoding step (MoE.decode_packed, all k experts at once) gives the weighted sum of
    `expert` over the experts the router chose, one token at a time; and a few tokens at once (the
    grouped path) give what those tokens give one by one. Float32 sums in another order aside, equal."""
    model = llmchat.load(tiny_gguf(kind, gguf.GGMLQuantizationType[qtype]), device="cpu", dtype="float32")
    block = _moe_blocks(model)[0]
    assert isinstance(block.down_exps, PackedExperts)
    hidden = block.router.weight.shape[0 if block.transposed else 1]
    x = torch.randn(6, hidden, generator=torch.Generator().manual_seed(4))
    weights, ids = block.route(x)
    assert len(set(ids.flatten().tolist())) > block.top_k  # the tokens do not all pick the same experts
    one_by_one = []
    for token in range(x.shape[0]):
        row = x[token : token + 1]
        expected = sum(block.expert(row, e) * w for e, w in zip(ids[token].tolist(), weights[token], strict=True))
        got = block._routed(row)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
        one_by_one.append(got)
    together = block._routed(x)
    torch.testing.assert_close(together, torch.cat(one_by_one), rtol=1e-5, atol=1e-6 * together.abs().max().item())


def test_packed_experts_come_back_from_the_packed_cache(
    tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    """The second load of a quantized MoE GGUF restores its packed experts from the cache, same logits."""
    path = tiny_gguf("mixtral", gguf.GGMLQuantizationType.Q4_0)
    first = llmchat.load(path, device="cpu", dtype="float32", cache_dir=tmp_path)
    second = llmchat.load(path, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert not first.info.from_cache and second.info.from_cache
    assert all(isinstance(block.down_exps, PackedExperts) for block in _moe_blocks(second))
    assert second.info.packing == first.info.packing
    ids = _ids(tiny_model("mixtral"), 12, seed=2)
    assert torch.equal(second.logits(ids), first.logits(ids))


def test_the_memory_bill_counts_packed_experts(tiny_gguf: Callable[..., Path]) -> None:
    """The predicted weight bytes of a packed MoE are the bytes its modules hold."""
    path = tiny_gguf("qwen3-moe", gguf.GGMLQuantizationType.Q4_0)
    model = llmchat.load(path, device="cpu", dtype="float32")
    plan = model.info.plan
    predicted = weight_bytes(
        model.package.config, torch.float32, plan, mapped_embedding=model.info.mapped_embedding > 0
    )
    assert predicted < weight_bytes(model.package.config, torch.float32, {})
    assert predicted == module_bytes(model.model)


def _without(folder: Path, out: Path, drop: Callable[[str], bool]) -> Path:
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys() if not drop(name)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (lambda name: ".experts." in name, "missing 4 tensor"),  # 2 layers x (gate_up, down)
        (lambda name: "layers.1.block_sparse_moe.experts.5.w3" in name, "missing parts of layers.1.mlp.gate_up_exps"),
        (lambda name: name.endswith("layers.0.block_sparse_moe.gate.weight"), "layers.0.mlp.router.weight"),
    ],
    ids=["no-experts", "one-expert-matrix", "no-router"],
)
def test_missing_expert_tensors_are_one_line_errors(
    drop: Callable[[str], bool], message: str, tiny_model: TinyModelFactory, tmp_path: Path
) -> None:
    folder = _without(tiny_model("mixtral"), tmp_path / "broken", drop)
    with pytest.raises(ModelLoadError, match=message) as error:
        llmchat.load(folder, device="cpu", dtype="float32")
    assert "\n" not in str(error.value)


def test_gguf_expert_count_must_match_its_tensors(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    """A file that says 6 experts but stacks 8 is refused when opened, in one line."""
    folder = tmp_path / "six"
    shutil.copytree(tiny_model("qwen3-moe"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] = config["num_experts"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    path = export_gguf(folder, tmp_path / "six.gguf")
    with pytest.raises(ModelLoadError, match=r"expert_count is 6 but blk\.0\.ffn_gate_exps\.weight") as error:
        llmchat.load(path, device="cpu", dtype="float32")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_parameter_counts(kind: str, tiny_model: TinyModelFactory) -> None:
    """The total is transformers' count; a token uses the router, its 2 experts and everything else."""
    from llmchat.engine.memory import active_parameter_count, parameter_count

    folder = tiny_model(kind)
    config = llmchat.load(folder, device="cpu", dtype="float32").config
    hf = hf_model(folder)
    total = sum(p.numel() for p in hf.parameters())
    assert hf.num_parameters() == total
    assert parameter_count(config) == total
    experts = [p for name, p in hf.named_parameters() if ".experts." in name]
    idle = sum(p.numel() for p in experts) * (8 - 2) // 8
    assert active_parameter_count(config) == total - idle


def test_olmoe_norms_span_the_whole_projection(tiny_model: TinyModelFactory) -> None:
    """OLMoE's q_norm has num_heads * head_dim weights and k_norm num_kv_heads * head_dim (one
    RMS over all heads), and clip_qkv changes the result (so the tiny model exercises it)."""
    model = llmchat.load(tiny_model("olmoe"), device="cpu", dtype="float32", packed=False)
    config = model.config
    for block in model.model.layers:
        assert block.attn.q_norm.weight.shape == (config.q_size,)
        assert block.attn.k_norm.weight.shape == (config.kv_size,)
    ids = _ids(tiny_model("olmoe"), LOGITS_LEN, seed=1)
    clipped = model.logits(ids)
    for block in model.model.layers:
        block.attn.clip = None
    assert (model.logits(ids) - clipped).abs().max().item() > 0.1


def test_qwen2_moe_sliding_layers_follow_transformers() -> None:
    """Without layer_types, Qwen2-MoE slides on the even layers below max_window_layers (transformers'
    Qwen2MoeConfig), and not at all without use_sliding_window."""
    from transformers import Qwen2MoeConfig

    base = {"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "vocab_size": 10}
    base |= {"num_hidden_layers": 6, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2}
    base |= {"sliding_window": 8, "max_window_layers": 4}
    for flag in (True, False):
        hf = Qwen2MoeConfig(**{k: v for k, v in base.items() if k != "architectures"}, use_sliding_window=flag)
        config = from_hf_config({**base, "use_sliding_window": flag})
        assert [t == "sliding_attention" for t in hf.layer_types] == list(config.sliding_layers)
        assert config.sliding_window == (8 if flag else None)
    sliding = from_hf_config({**base, "use_sliding_window": True}).sliding_layers
    assert sliding == (True, False, True, False, False, False)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (lambda name: name.endswith("layers.2.mlp.shared_expert.up_proj.weight"), "parts of layers.2.mlp.shared"),
        (lambda name: name.endswith("layers.0.mlp.shared_expert.down_proj.weight"), "layers.0.mlp.shared.down"),
        (lambda name: name.endswith("layers.0.mlp.shared_expert_gate.weight"), "layers.0.mlp.shared_gate"),
    ],
    ids=["up", "down", "gate"],
)
def test_missing_shared_expert_tensors_are_one_line_errors(
    drop: Callable[[str], bool], message: str, tiny_model: TinyModelFactory, tmp_path: Path
) -> None:
    """From the folder (the engine's names) and from its GGUF export (the file's names)."""
    folder = _without(tiny_model("qwen2-moe"), tmp_path / "broken", drop)
    with pytest.raises(ModelLoadError, match=message) as error:
        llmchat.load(folder, device="cpu", dtype="float32")
    assert "\n" not in str(error.value)
    path = export_gguf(folder, tmp_path / "broken.gguf")
    with pytest.raises(ModelLoadError, match=r"MoE layer \d has no shared expert blk\.\d\.ffn_\w+_shexp") as error:
        llmchat.load(path, device="cpu", dtype="float32")
    assert "\n" not in str(error.value)


def test_quantized_shared_expert_is_dequantized_at_load(
    tiny_model: TinyModelFactory, tiny_gguf: Callable[..., Path]
) -> None:
    """A Q8_0 Qwen2-MoE GGUF: the shared expert (quantized in the file) loads as float32, its gate
    as [1, hidden], and the packed model's argmax agrees with the float one's."""
    path = tiny_gguf("qwen2-moe", gguf.GGMLQuantizationType.Q8_0)
    shexp = [t for t in gguf.GGUFReader(path).tensors if "_shexp" in t.name and "inp" not in t.name]
    assert shexp and all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in shexp)
    packed = llmchat.load(path, device="cpu", dtype="float32")
    assert not any("shared" in t for t in packed.info.plan)
    for block in _moe_blocks(packed):
        assert block.shared is not None and block.shared_gate is not None
        assert block.shared.gate_up.weight.dtype == block.shared.down.weight.dtype == torch.float32
        assert block.shared_gate.weight.numel() == packed.config.hidden_size
    ids = _ids(tiny_model("qwen2-moe"), LOGITS_LEN, seed=1)
    plain = llmchat.load(path, device="cpu", dtype="float32", packed=False).logits(ids)
    agree = (packed.logits(ids).argmax(-1) == plain.argmax(-1)).float().mean().item()
    assert agree >= 0.8, f"packed argmax agrees on {agree:.0%} of positions"


def test_vram_tells_experts_and_active_parameters(tiny_gguf: Callable[..., Path]) -> None:
    """`llmchat vram` (JSON and text) says how many experts there are and how much of the model a token runs."""
    import subprocess
    import sys

    from llmchat.engine.memory import active_parameter_count, parameter_count
    from llmchat.engine.package import open_package

    path = tiny_gguf("qwen3-moe", gguf.GGMLQuantizationType.Q4_0)
    run = [sys.executable, "-m", "llmchat", "vram", str(path), "--context", "64"]
    data = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    config = open_package(path).config
    assert data["experts"] == 8 and data["experts_per_token"] == 2
    assert data["active_parameters"] == active_parameter_count(config) < parameter_count(config)
    assert "experts → int4" in data["weights"]
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "8 experts on 2 layers, all held; a token runs 2 of them" in text
