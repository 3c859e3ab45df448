"""Granite 4 (GraniteMoeHybridForCausalLM): Mamba-2 layers between attention layers, MoE + shared MLP.

The tiny `granite4` (MoE, no RoPE, 2 B/C groups, SSD chunks of 16) and `granite4-dense` (no
experts, RoPE) kinds run through every KINDS test of test_parity.py and the HYBRID_KINDS tests of
test_hybrid.py. Here: the config defaults and layout rules are GraniteMoeHybridConfig's, the SSD
chunked scan and the one-token update are transformers' (`mamba2_chunk_scan`,
`mamba2_selective_state_update`) on random float32 inputs, one Mamba-2 layer is transformers' layer
(and would not be without D, the gate or the per-group norm), time_step_limit clamps the prefill as
transformers does, and the router really picks different experts per token.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
import torch.nn.functional as F
from transformers import GraniteMoeHybridConfig
from transformers.models.granitemoehybrid import modeling_granitemoehybrid as reference

import llmchat
from llmchat.engine.config import from_hf_config
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.events import TokenEvent
from llmchat.engine.gguf import GGUFFile
from llmchat.engine.kv_cache import StateSpec
from llmchat.engine.mamba2 import Mamba2, chunked_scan, mamba_state, recurrent_step
from llmchat.engine.model import Attention, SharedMLP
from llmchat.engine.moe import MoE
from tests.gguf_export import export_gguf
from tests.hf_reference import hf_greedy, hf_logits, hf_model, random_ids, vocab_size

TOL = 1e-4
TinyModelFactory = Callable[..., Path]
GREEDY = llmchat.SamplingParams(temperature=0)


pytestmark = pytest.mark.usefixtures("one_thread")


_MINIMAL = {
    "architectures": ["GraniteMoeHybridForCausalLM"],
    "model_type": "granitemoehybrid",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "vocab_size": 300,
}


@pytest.mark.parametrize(
    "keys",
    [
        {},  # nothing said: the config class's defaults (every layer Mamba-2, 128 heads, 8 experts ...)
        {
            "layer_types": ["mamba", "attention", "mamba", "mamba"],
            "mamba_n_heads": 8,
            "position_embedding_type": "rope",
        },
        {"layers_block_type": ["attention", "mamba", "attention", "mamba"], "mamba_n_heads": 4, "mamba_n_groups": 2},
        {"layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"]},
        {"num_local_experts": 0, "shared_intermediate_size": 96, "mamba_d_head": 16, "mamba_n_heads": 8},
        {"num_local_experts": 4, "num_experts_per_tok": 3, "intermediate_size": 40, "time_step_limit": [0.1, 2.0]},
    ],
)
def test_config_follows_the_config_class(keys: dict[str, Any]) -> None:
    raw = {**_MINIMAL, **keys}
    ref = GraniteMoeHybridConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    config = from_hf_config(raw)
    kinds = ["mamba" if t == "linear_attention" else "attention" for t in ref.layer_types]
    assert list(config.layer_kinds) == kinds
    assert (config.ssm_heads, config.ssm_head_dim, config.ssm_groups) == (
        ref.mamba_n_heads,
        ref.mamba_d_head,
        ref.mamba_n_groups,
    )
    assert (config.ssm_state_size, config.conv_kernel, config.ssm_chunk_size) == (
        ref.mamba_d_state,
        ref.mamba_d_conv,
        ref.mamba_chunk_size,
    )
    assert (config.conv_bias, config.ssm_proj_bias) == (ref.mamba_conv_bias, ref.mamba_proj_bias)
    assert config.ssm_dt_limit == tuple(ref.time_step_limit)
    assert (config.num_experts, config.num_experts_per_tok) == (ref.num_local_experts, ref.num_experts_per_tok)
    assert config.moe_intermediate_size == ref.intermediate_size
    assert config.intermediate_size == config.shared_expert_intermediate_size == ref.shared_intermediate_size
    assert config.moe_softmax_topk and not config.shared_expert_gate
    assert [config.uses_rope(i) for i in range(4)] == [ref.position_embedding_type == "rope"] * 4
    assert config.attn_scale == ref.attention_multiplier and config.embed_scale is None
    assert config.rms_norm_eps == ref.rms_norm_eps and config.tie_word_embeddings == ref.tie_word_embeddings


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"layer_types": ["mamba", "conv", "mamba", "mamba"]}, "unsupported layer type.*'conv'"),
        ({"layer_types": ["mamba", "attention"]}, "layer_types has 2 entries for 4 layers"),
        ({"mamba_n_heads": 8, "mamba_d_head": 8}, "8 Mamba heads of 8 do not make"),
        ({"mamba_n_heads": 8, "mamba_n_groups": 3}, "not a multiple of mamba_n_groups 3"),
        ({"time_step_limit": [0.0]}, "time_step_limit must be a \\[low, high\\] pair"),
    ],
)
def test_bad_configs_are_refused_in_one_line(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as error:
        from_hf_config({**_MINIMAL, **keys})
    assert "\n" not in str(error.value)


def test_infinity_is_read_however_json_spells_it() -> None:
    for spelled in ("Infinity", "inf", {"__float__": "Infinity"}, float("inf")):
        assert from_hf_config({**_MINIMAL, "time_step_limit": [0.0, spelled]}).ssm_dt_limit == (0.0, float("inf"))


def _scan_inputs(seed: int, n: int, heads: int = 6, groups: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p, d = 8, 5

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    return {
        "x": rand(1, n, heads, p),
        "dt": rand(1, n, heads),
        "A": -torch.exp(0.5 * rand(heads)),
        "B": rand(1, n, groups, d),
        "C": rand(1, n, groups, d),
        "D": rand(heads),
        "dt_bias": rand(heads),
        "state": rand(1, heads, p, d),
    }


def _ours(inputs: dict[str, torch.Tensor], chunk: int, limit: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our scan on transformers' layout: dt through softplus and the clamp, groups repeated, D added."""
    heads, groups = inputs["x"].shape[2], inputs["B"].shape[2]
    x = inputs["x"][0].transpose(0, 1)
    dt = F.softplus(inputs["dt"][0] + inputs["dt_bias"]).clamp(*limit).t()
    B, C = (inputs[k][0].repeat_interleave(heads // groups, dim=1).transpose(0, 1) for k in ("B", "C"))
    state = inputs["state"][0].clone()
    y = chunked_scan(x, dt, inputs["A"], B, C, state, chunk) + x * inputs["D"][:, None, None]
    return y.transpose(0, 1), state


@pytest.mark.parametrize(("n", "chunk"), [(40, 16), (16, 16), (5, 16), (33, 8), (2, 4)])
@pytest.mark.parametrize("limit", [(0.0, float("inf")), (0.3, 0.9)])
def test_chunked_scan_is_transformers(n: int, chunk: int, limit: tuple[float, float]) -> None:
    """Outputs and final state of `mamba2_chunk_scan` (initial state, groups, a partial last chunk)."""
    inputs = _scan_inputs(n * 10 + chunk, n)
    expected, final = reference.mamba2_chunk_scan(
        inputs["x"],
        inputs["dt"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        chunk_size=chunk,
        D=inputs["D"],
        dt_bias=inputs["dt_bias"],
        initial_states=inputs["state"],
        dt_softplus=True,
        dt_limit=limit,
        return_final_states=True,
    )
    got, state = _ours(inputs, chunk, limit)
    scale = expected.abs().max().item()
    assert (got - expected[0]).abs().max().item() <= 1e-5 * scale
    assert (state - final[0]).abs().max().item() <= 1e-5 * final.abs().max().item()
    if limit[0] > 0:  # the clamp bites on these inputs
        unclamped, _ = _ours(inputs, chunk, (0.0, float("inf")))
        assert (unclamped - got).abs().max().item() > 0.01 * scale


def test_chunked_scan_is_the_recurrence() -> None:
    """The chunked form gives what token-by-token steps give, outputs and state."""
    inputs = _scan_inputs(3, 37)
    heads, groups = 6, 3
    x = inputs["x"][0]
    dt = F.softplus(inputs["dt"][0] + inputs["dt_bias"])
    B, C = (inputs[k][0].repeat_interleave(heads // groups, dim=1) for k in ("B", "C"))
    state = inputs["state"][0].clone()
    steps = torch.stack([recurrent_step(x[t], dt[t], inputs["A"], B[t], C[t], state) for t in range(37)])
    chunked_state = inputs["state"][0].clone()
    chunked = chunked_scan(
        x.transpose(0, 1), dt.t(), inputs["A"], B.transpose(0, 1), C.transpose(0, 1), chunked_state, 8
    )
    assert torch.allclose(chunked.transpose(0, 1), steps, atol=1e-4, rtol=1e-4)
    assert torch.allclose(chunked_state, state, atol=1e-4, rtol=1e-4)


def test_recurrent_step_is_transformers_selective_state_update() -> None:
    inputs = _scan_inputs(7, 1)
    heads, groups, p, d = 6, 3, 8, 5
    state = inputs["state"].clone()
    expected = reference.mamba2_selective_state_update(
        state,
        inputs["x"][:, 0],
        inputs["dt"][:, 0, :, None].expand(-1, -1, p),
        inputs["A"][:, None, None].expand(-1, p, d),
        inputs["B"][:, 0],
        inputs["C"][:, 0],
        inputs["D"][:, None].expand(-1, p),
        dt_bias=inputs["dt_bias"][:, None].expand(-1, p),
        dt_softplus=True,
    )
    ours_state = inputs["state"][0].clone()
    dt = F.softplus(inputs["dt"][0, 0] + inputs["dt_bias"])
    B, C = (inputs[k][0, 0].repeat_interleave(heads // groups, dim=0) for k in ("B", "C"))
    got = (
        recurrent_step(inputs["x"][0, 0], dt, inputs["A"], B, C, ours_state) + inputs["x"][0, 0] * inputs["D"][:, None]
    )
    assert torch.allclose(got, expected[0], atol=1e-5) and torch.allclose(ours_state, state[0], atol=1e-5)


class _Cache:
    """What a Mamba2 layer reads from a KVCache: its state tensors."""

    def __init__(self, specs: tuple[StateSpec, ...]) -> None:
        self.tensors = tuple(torch.zeros(spec.shape) for spec in specs)

    def state(self, layer: int) -> tuple[torch.Tensor, ...]:
        return self.tensors


def _layer_pair(seed: int = 0) -> tuple[Any, Mamba2, Any]:
    """transformers' Mamba-2 layer with random weights, and ours holding the same."""
    raw = {
        **_MINIMAL,
        "mamba_n_heads": 8,
        "mamba_n_groups": 2,
        "mamba_d_state": 16,
        "mamba_chunk_size": 16,
        "rms_norm_eps": 1e-6,
    }
    ref_config = GraniteMoeHybridConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    theirs = reference.GraniteMoeHybridMambaLayer(ref_config, 0).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else noise * param.shape[-1] ** -0.5)
    config = from_hf_config(raw)
    ours = Mamba2(config, 0, transposed=False)
    state = theirs.state_dict()
    names = {"conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias", "norm.weight": "norm_weight"}
    ours.load_state_dict({names.get(k, k): v for k, v in state.items()}, assign=True)
    return theirs, ours, config


def test_mamba_layer_is_transformers_and_d_the_gate_and_the_groups_matter() -> None:
    """40 tokens through one layer (three SSD chunks) give transformers' output; without the D skip,
    without the gate or with one norm over all groups, transformers' layer would be far off ours."""
    theirs, ours, config = _layer_pair()
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(x[None])[0]
        got = ours(x, torch.empty(0), torch.empty(0), _Cache(mamba_state(config)), 0)
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-5 * scale

        def far(variant: torch.Tensor) -> bool:
            return (variant - got).abs().max().item() > 0.05 * scale

        d = theirs.D.clone()
        theirs.D.zero_()
        assert far(theirs(x[None])[0]), "D is not exercised"
        theirs.D.copy_(d)
        gated = theirs.norm.forward
        theirs.norm.forward = lambda hidden, gate=None: gated(hidden, None)  # type: ignore[method-assign]
        assert far(theirs(x[None])[0]), "the gate is not exercised"
        theirs.norm.forward = gated  # type: ignore[method-assign]
        theirs.norm.group_size = ours.inner
        assert far(theirs(x[None])[0]), "the per-group norm is not exercised"


def test_mamba_layer_steps_match_its_prefill() -> None:
    """A prefill of 20 tokens, then 5 one-token steps from its state, give a 25-token prefill's rows."""
    _, ours, config = _layer_pair(1)
    x = torch.randn(25, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ours(x, torch.empty(0), torch.empty(0), _Cache(mamba_state(config)), 0)
        cache = _Cache(mamba_state(config))
        rows = [ours(x[:20], torch.empty(0), torch.empty(0), cache, 0)]
        rows += [ours(x[t : t + 1], torch.empty(0), torch.empty(0), cache, t) for t in range(20, 25)]
    assert torch.allclose(torch.cat(rows), whole, atol=1e-5)


def test_layers_and_state_of_the_tiny_models(tiny_model: TinyModelFactory) -> None:
    model = llmchat.load(tiny_model("granite4"), device="cpu", dtype="float32")
    assert [type(b.mixer) for b in model.model.layers] == [Mamba2, Attention, Mamba2, Mamba2]
    assert all(
        isinstance(b.mlp, MoE) and b.mlp.shared is not None and b.mlp.shared_gate is None for b in model.model.layers
    )
    conv, ssm = model.cache.state(0)
    assert conv.shape == (3, 128 + 2 * 2 * 16) and ssm.shape == (8, 16, 16) and ssm.dtype == torch.float32
    assert model.cache.recurrent_layers == [0, 2, 3]
    dense = llmchat.load(tiny_model("granite4-dense"), device="cpu", dtype="float32")
    assert all(isinstance(b.mlp, SharedMLP) for b in dense.model.layers)
    assert [b.mixer.rotates for b in dense.model.layers if isinstance(b.mixer, Attention)] == [True, True]
    assert not model.model.layers[1].mixer.rotates  # position_embedding_type None: no RoPE
    assert dense.cache.state(0)[0].shape == (2, 128 + 2 * 8)  # kernel 3, one group of state 8


def test_the_router_picks_different_experts_per_token(tiny_model: TinyModelFactory) -> None:
    """Self-check: the parity tests route tokens to most experts, in varying pairs."""
    model = llmchat.load(tiny_model("granite4"), device="cpu", dtype="float32")
    chosen: list[torch.Tensor] = []
    moe = model.model.layers[2].mlp
    route = moe.route

    def recording(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = route(x)
        chosen.append(ids)
        return weights, ids

    moe.route = recording  # type: ignore[method-assign]
    model.logits(random_ids(40, model.config.vocab_size, seed=1))
    (ids,) = chosen
    assert ids.unique().numel() >= 6 and len({tuple(sorted(row)) for row in ids.tolist()}) >= 8


@pytest.fixture(scope="module")
def limited(tiny_model: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny granite4 folder with a time_step_limit that bites."""
    folder = tmp_path_factory.mktemp("granite4-limit") / "model"
    shutil.copytree(tiny_model("granite4"), folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "time_step_limit": [0.4, 0.8]}))
    return folder


def test_time_step_limit_clamps_like_transformers(limited: Path, tiny_model: TinyModelFactory) -> None:
    """A 40-token prefill clamps dt (and the logits change for it); decoding, which transformers does
    not clamp, gives its greedy tokens."""
    ids = random_ids(40, vocab_size(limited), seed=1)
    expected = hf_logits(hf_model(limited), ids)
    model = llmchat.load(limited, device="cpu", dtype="float32")
    assert model.config.ssm_dt_limit == (0.4, 0.8)
    got = model.logits(ids)
    assert (got - expected).abs().max().item() <= TOL
    unlimited = llmchat.load(tiny_model("granite4"), device="cpu", dtype="float32").logits(ids)
    assert (unlimited - got).abs().max().item() > 0.05
    prompt = ids[:12]
    assert _tokens(model, prompt, 12) == hf_greedy(hf_model(limited), prompt, 12)


# -- GGUF: llama.cpp's granitehybrid --------------------------------------------------------------


@pytest.fixture(scope="module")
def nope_dense(tiny_model: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """granite4-dense without RoPE: what its GGUF twin says (the converter writes rope.scaling.finetuned
    false for every hybrid, and llama.cpp's granitehybrid then attends without positions)."""
    folder = tmp_path_factory.mktemp("granite4-dense-nope") / "model"
    shutil.copytree(tiny_model("granite4-dense"), folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "position_embedding_type": None}))
    return folder


@pytest.fixture(scope="module")
def granite4_gguf(
    tiny_model: TinyModelFactory, nope_dense: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """`granite4_gguf(kind, qtype)` -> the folder exported as llama.cpp's converter would, cached."""
    root = tmp_path_factory.mktemp("granite4-gguf")
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str = "granite4", qtype: str = "F32") -> Path:
        if (kind, qtype) not in made:
            folder = nope_dense if kind == "granite4-dense" else tiny_model(kind)
            stored = gguf.GGMLQuantizationType[qtype]
            made[kind, qtype] = export_gguf(folder, root / f"{kind}-{qtype}.gguf", qtype=stored)
        return made[kind, qtype]

    return get


def _tokens(model: Any, prompt: list[int], n: int) -> list[int]:
    events = model.generate(prompt, sampling=GREEDY, max_new_tokens=n, stop_on_eos=False)
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


@pytest.mark.parametrize("kind", ["granite4", "granite4-dense"])
def test_gguf_twin_undoes_the_converters_rewrites(
    kind: str, tiny_model: TinyModelFactory, nope_dense: Path, granite4_gguf: Callable[..., Path]
) -> None:
    """GraniteHybridModel's file: head_count_kv 0 marks the Mamba-2 layers, A_log stored as -exp(A_log),
    A and D as [heads, 1], dt_bias as ssm_dt.bias, the norm per group, conv filters squeezed, experts'
    gate|up and the shared MLP split (ffn_*_shexp, or ffn_{gate,up,down} without experts), the vocab
    padded to a multiple of 8. Undone, it gives the folder's logits, tokens and config."""
    folder = nope_dense if kind == "granite4-dense" else tiny_model(kind)
    path = granite4_gguf(kind)
    file = GGUFFile(path)
    names = set(file.tensor_info)
    assert {"blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_dt.bias", "blk.0.ssm_in.weight", "blk.0.ssm_out.weight"} <= names
    assert file.tensor_info["blk.0.ssm_a"].shape == (file.hf_config()["mamba_n_heads"], 1)
    shared = {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight"}
    dense = {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"}
    if kind == "granite4":
        assert shared | {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate_inp.weight"} <= names and not dense & names
    else:
        assert dense <= names and not shared & names and "blk.0.ffn_gate_inp.weight" not in names
    assert len(file.metadata["tokenizer.ggml.tokens"]) % 8 == 0 != file.hf_config()["vocab_size"] % 8
    ours, theirs = (llmchat.load(p, device="cpu", dtype="float32") for p in (path, folder))
    fields = (
        "layer_kinds",
        "ssm_heads",
        "ssm_head_dim",
        "ssm_state_size",
        "ssm_groups",
        "conv_kernel",
        "conv_bias",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "rope_layers",
        "vocab_size",
    )
    assert {f: getattr(ours.config, f) for f in fields} == {f: getattr(theirs.config, f) for f in fields}
    for scale in ("embed_scale", "attn_scale", "residual_scale", "logit_scale"):  # stored as float32
        assert getattr(ours.config, scale) == pytest.approx(getattr(theirs.config, scale), rel=1e-6)
    ids = random_ids(40, ours.config.vocab_size, seed=1)
    diff = (ours.logits(ids) - theirs.logits(ids)).abs().max().item()
    assert diff <= TOL, f"GGUF logits differ from the folder's by {diff:.2e}"
    assert _tokens(ours, ids[:12], 20) == _tokens(theirs, ids[:12], 20)


def test_the_dense_twin_really_drops_rope(tiny_model: TinyModelFactory, nope_dense: Path) -> None:
    """Self-check: without RoPE granite4-dense's logits change, so the twin's comparison is not vacuous."""
    ids = random_ids(40, vocab_size(nope_dense), seed=1)
    rotating, plain = (
        llmchat.load(f, device="cpu", dtype="float32") for f in (tiny_model("granite4-dense"), nope_dense)
    )
    assert (rotating.logits(ids) - plain.logits(ids)).abs().max().item() > 0.05
    assert (plain.logits(ids) - hf_logits(hf_model(nope_dense), ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["granite4", "granite4-dense"])
def test_quantized_twin_packs_the_mamba_projections_experts_and_shared_mlp(
    kind: str, granite4_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    """Q8_0: the Mamba-2 in/out projections, the experts and the shared MLP stay packed like attention's
    matrices; the filters, norms, A, D and the router stay float."""
    path = granite4_gguf(kind, "Q8_0")
    packed = llmchat.load(path, device="cpu", dtype="float32")
    plain = llmchat.load(path, device="cpu", dtype="float32", packed=False)
    plan = set(packed.info.plan)
    assert {"layers.0.mamba.in_proj.weight", "layers.0.mamba.out_proj.weight", "layers.1.attn.qkv.weight"} <= plan
    assert "layers.0.mlp.shared.gate_up.weight" in plan
    if kind == "granite4":  # the shared down projection's rows (48) are no whole Q8_0 blocks: stored F32
        assert {"layers.0.mlp.gate_up_exps", "layers.0.mlp.down_exps"} <= plan
    else:
        assert "layers.0.mlp.shared.down.weight" in plan
    assert packed.model.layers[0].mamba.conv_weight.dtype == torch.float32
    ids = random_ids(40, packed.config.vocab_size, seed=1)
    approx, reference = packed.logits(ids), plain.logits(ids)
    off = (approx - reference).abs().amax(-1) / reference.abs().max()
    assert off.median().item() < 0.05 and (approx.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.8
    stored = [llmchat.load(path, device="cpu", dtype="float32", cache_dir=tmp_path) for _ in range(2)]
    assert [m.info.from_cache for m in stored] == [False, True]  # the packed-model cache restores them
    assert torch.equal(stored[1].logits(ids), approx)


@pytest.mark.parametrize("kind", ["granite4-micro", "granite4-mamba"])
@pytest.mark.parametrize("style", ["new", "old"])
def test_all_attention_and_all_mamba_stacks_match_transformers(
    kind: str, style: str, tiny_model: TinyModelFactory
) -> None:
    """Granite 4 Micro's layout (every layer attends, RoPE, no experts) and a stack without attention
    (the cache holds no keys and values at all): transformers' logits and greedy tokens (for the
    latter by full forward passes: transformers' cache cannot tell its length without attention)."""
    folder = tiny_model(kind, style)
    ids = random_ids(40, vocab_size(folder), seed=1)
    model = llmchat.load(folder, device="cpu", dtype="float32")
    reference = hf_model(folder)

    def forward(tokens: list[int]) -> torch.Tensor:  # without a cache, which transformers cannot make here
        with torch.no_grad():
            return reference(torch.tensor([tokens]), use_cache=False).logits[0]

    diff = (model.logits(ids) - forward(ids)).abs().max().item()
    assert diff <= TOL, f"{kind}: {diff:.2e}"
    expected = ids[:12]
    for _ in range(20):
        expected = [*expected, int(forward(expected)[-1].argmax())]
    assert _tokens(model, ids[:12], 20) == expected[12:]
    assert model.cache.recurrent_layers == ([] if kind == "granite4-micro" else [0, 1, 2])
