"""The layer views (engine/inside.py) against transformers' own outputs on tiny random models.

Residual norms against `output_hidden_states`, the logit lens against transformers' final norm and
output projection applied to those hidden states, attention weights against `output_attentions`
(eager attention: sliding windows, soft caps, parallel blocks, sinks), expert routes against
`output_router_logits`, the prompt heatmap against transformers' logits over the prompt. And the
views leave nothing behind: the cache, the next answer and the model's hooks are as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmchat
from llmchat.cli import main
from llmchat.engine.inside import answer_experts, inside_step, prompt_heatmap
from tests.hf_reference import llmchat_greedy, random_ids, vocab_size

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = 24  # tokens: longer than the tiny models' sliding windows (8)


def _hf(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _ours(folder: Path):  # noqa: ANN202 - a LoadedModel
    return llmchat.load(folder, device="cpu", dtype="float32", context_length=128)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2", "gemma3", "cohere2", "qwen3-moe"])
def test_residuals_lens_and_attention_match_transformers(kind: str, tiny_model) -> None:
    folder = tiny_model(kind)
    ids = random_ids(PROMPT, vocab_size(folder), seed=3)
    hf = _hf(folder)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    model = _ours(folder)
    chosen = int(out.logits[0, -1].argmax())
    step = inside_step(model.generator, ids, chosen=chosen)
    layers = model.config.num_layers

    assert step.position == PROMPT - 1 and [r.layer for r in step.lens] == list(range(-1, layers))
    # hidden_states[0] is the embeddings, [i + 1] the residual after layer i (the last one normed by transformers)
    for readout, hidden in zip(step.lens[:-1], out.hidden_states[:-1], strict=True):
        assert readout.residual_norm == pytest.approx(float(hidden[0, -1].norm()), rel=1e-4)
    # the lens after the last layer is the model's own distribution
    final = out.logits[0, -1].softmax(-1)
    assert [c.token_id for c in step.lens[-1].top] == final.topk(5).indices.tolist()
    assert step.lens[-1].chosen_prob == pytest.approx(float(final[chosen]), abs=1e-5)
    assert step.lens[-1].chosen_rank == 0
    if kind in ("llama", "qwen3", "qwen3-moe"):  # no logit scale or soft cap outside lm_head(norm(x))
        for readout, hidden in zip(step.lens[1:-1], out.hidden_states[1:-1], strict=True):
            with torch.no_grad():
                probs = hf.lm_head(hf.model.norm(hidden[0, -1])).softmax(-1)
            assert [c.token_id for c in readout.top] == probs.topk(5).indices.tolist()
            assert [c.prob for c in readout.top] == pytest.approx(probs.topk(5).values.tolist(), abs=1e-5)
    # each layer's weights for the last query, per head, over every position (zeros outside a window)
    assert [a.layer for a in step.attention] == list(range(layers))
    for pattern, reference in zip(step.attention, out.attentions, strict=True):
        expected = reference[0, :, -1, :]
        assert torch.tensor(pattern.weights) == pytest.approx(expected, abs=1e-5)
        if pattern.window is not None:
            assert all(w == 0.0 for row in pattern.weights for w in row[: PROMPT - pattern.window])
    assert any(a.window is not None for a in step.attention) == (kind in ("gemma2", "gemma3", "cohere2"))


def test_sinks_take_their_share_of_attention(tmp_path: Path) -> None:
    """gpt-oss: a head's weights over the positions and its sink's share sum to 1, as transformers' do."""
    from tests.tiny_gpt_oss import build_gpt_oss

    folder = build_gpt_oss(tmp_path / "gpt-oss")
    ids = random_ids(PROMPT, vocab_size(folder), seed=5)
    with torch.no_grad():
        out = _hf(folder)(torch.tensor([ids]), output_attentions=True)
    step = inside_step(_ours(folder).generator, ids)
    for pattern, reference in zip(step.attention, out.attentions, strict=True):
        assert pattern.sink is not None
        assert torch.tensor(pattern.weights) == pytest.approx(reference[0, :, -1, :], abs=1e-5)
        for row, sink in zip(pattern.weights, pattern.sink, strict=True):
            assert sum(row) + sink == pytest.approx(1.0, abs=1e-5) and sink > 0


def test_expert_routes_match_transformers_router(tiny_model) -> None:
    """The experts a step and a whole answer were routed to: transformers' router logits' top k."""
    folder = tiny_model("qwen3-moe")
    vocab = vocab_size(folder)
    prompt, answer = random_ids(16, vocab, seed=7), random_ids(6, vocab, seed=8)
    model = _ours(folder)
    with torch.no_grad():
        out = _hf(folder)(torch.tensor([prompt + answer]), output_router_logits=True)
    sparse = [i for i in range(model.config.num_layers) if model.config.is_moe_layer(i)]
    routers = dict(zip(sparse, out.router_logits, strict=True))  # one [tokens, experts] per sparse layer
    k = model.config.num_experts_per_tok

    def expected(layer: int, position: int) -> set[int]:
        return set(routers[layer][position].topk(k).indices.tolist())

    step = inside_step(model.generator, prompt + answer[:3])
    assert [r.layer for r in step.routes] == sparse
    for route in step.routes:
        assert set(route.experts) == expected(route.layer, len(prompt) + 2)
        assert len(route.weights) == k and all(w > 0 for w in route.weights)
    experts = answer_experts(model.generator, prompt, answer)
    assert len(experts.tokens) == len(answer)
    for i, routes in enumerate(experts.tokens):
        for route in routes:
            assert set(route.experts) == expected(route.layer, len(prompt) + i)
    assert set(experts.load) == set(sparse)
    assert all(sum(counts) == len(answer) * k for counts in experts.load.values())


@pytest.mark.parametrize("kind", ["lfm2", "qwen3_5"])
def test_recurrent_layers_show_their_state_and_its_change(kind: str, tiny_model) -> None:
    folder = tiny_model(kind)
    ids = random_ids(PROMPT, vocab_size(folder), seed=9)
    with torch.no_grad():
        out = _hf(folder)(torch.tensor([ids]), output_hidden_states=True)
    model = _ours(folder)
    step = inside_step(model.generator, ids)
    recurrent = model.generator.cache.recurrent_layers
    assert recurrent and [s.layer for s in step.states] == recurrent
    for change in step.states:
        state = model.generator.cache.state(change.layer)
        assert change.state_bytes == sum(t.numel() * t.element_size() for t in state)
        assert change.state_norm > 0 and change.update_norm > 0
    assert [a.layer for a in step.attention] == model.config.attention_layers
    for readout, hidden in zip(step.lens[:-1], out.hidden_states[:-1], strict=True):
        assert readout.residual_norm == pytest.approx(float(hidden[0, -1].norm()), rel=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_prompt_heatmap_is_transformers_distribution_at_every_position(kind: str, tiny_model) -> None:
    folder = tiny_model(kind)
    ids = random_ids(40, vocab_size(folder), seed=11)
    with torch.no_grad():
        logprobs = _hf(folder)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    tokens = prompt_heatmap(_ours(folder).generator, ids)
    assert [t.index for t in tokens] == list(range(len(ids))) and tokens[0].prob is None
    for token in tokens[1:]:
        row = logprobs[token.index - 1]
        assert token.token_id == ids[token.index]
        assert token.prob == pytest.approx(float(row[token.token_id].exp()), abs=1e-5)
        assert token.rank == int((row > row[token.token_id]).sum())
        assert token.entropy == pytest.approx(float(-(row.exp() * row).sum()) / 0.6931471805599453, abs=1e-4)
        assert [c.token_id for c in token.top] == row.topk(5).indices.tolist()


@pytest.mark.parametrize("kind", ["llama", "gemma2", "lfm2"])
def test_the_views_leave_the_cache_the_answer_and_the_model_as_they_were(kind: str, tiny_model) -> None:
    """After every view the KV cache holds exactly what it held (keys, values, rings, recurrent states,
    token ids), no hook or patch is left on the model, and a new answer is the one it was."""
    folder = tiny_model(kind)
    prompt = random_ids(PROMPT, vocab_size(folder), seed=13)
    model = _ours(folder)
    before = llmchat_greedy(model, prompt, 12)
    cache = model.generator.cache
    tensors = [cache.keys, cache.values, cache.ring_keys, cache.ring_values, *cache._state_tensors]
    held, tokens = [t.clone() for t in tensors], list(cache.tokens)
    answer = before[:5]
    inside_step(model.generator, prompt + answer)
    prompt_heatmap(model.generator, prompt + before)
    answer_experts(model.generator, prompt, answer)
    assert cache.tokens == tokens
    assert all(torch.equal(a, b) for a, b in zip(tensors, held, strict=True))
    left = [
        m for m in model.generator.model.modules() if m._forward_hooks or m._forward_pre_hooks or "_attend" in vars(m)
    ]
    assert left == []
    assert llmchat_greedy(model, prompt, 12) == before


def _inspect(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[dict], str]:
    code = main(["inspect", *(str(a) for a in args)])
    out = capsys.readouterr()
    return code, [json.loads(line) for line in out.out.splitlines() if line.startswith("{")], out.err


def test_inspect_prints_the_layer_views_as_json(tiny_model, capsys: pytest.CaptureFixture[str]) -> None:
    """`llmchat inspect --layers STEP --prompt-heatmap --experts --json`: one object per view after the
    answer, the step's chosen token the answer's, the heatmap one entry per prompt token."""
    folder = tiny_model("qwen3-moe")
    code, lines, _ = _inspect(
        capsys, folder, "--prompt", "hello", "--max-new-tokens", 6, "--layers", 2,
        "--prompt-heatmap", "--experts", "--json",
    )  # fmt: skip
    assert code == 0
    by_event = {line["event"]: line for line in lines}
    finished, layers = by_event["finished"], by_event["layers"]
    config = llmchat.load(folder, device="cpu", dtype="float32", context_length=64).config
    assert layers["step"] == 2 and layers["chosen_id"] == finished["token_ids"][2]
    assert len(layers["lens"]) == config.num_layers + 1 and len(layers["attention"]) == config.num_layers
    assert len(by_event["prompt_heatmap"]["tokens"]) == finished["prompt_tokens"]
    assert len(by_event["experts"]["tokens"]) == finished["generated_tokens"]


def test_inspect_refuses_a_step_the_answer_does_not_have(tiny_model, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _inspect(capsys, tiny_model("llama"), "--prompt", "hi", "--max-new-tokens", 3, "--layers", 9)
    assert code == 2 and "llmchat: error: the answer has no step 9" in err


def test_quantization_diff_compares_the_packed_answer_with_the_float_reference(tiny_gguf) -> None:
    """Each token's probabilities under the packed model and under the file's float32 reference, each
    as that model computes them over the whole sequence in one pass (a fresh load, independent of the
    session's lazily loaded reference); KL is the reference's divergence from the packed distribution."""
    from llmchat.session import LocalSession

    path = tiny_gguf("llama", "Q4_0")
    session = LocalSession(llmchat.load(path, device="cpu", dtype="float32", context_length=128), top_k=5)
    assert session.model.info.packing != "float"
    prompt = random_ids(12, session.model.config.vocab_size, seed=17)
    answer = llmchat_greedy(session.model, prompt, 8)
    tokens = session.quantization_diff(prompt, answer)
    assert [t.token_id for t in tokens] == answer
    assert all(t.greedy_id == t.token_id and t.rank == 0 for t in tokens)  # the answer was greedy on packed weights
    for packed in (True, False):
        model = llmchat.load(path, device="cpu", dtype="float32", packed=packed)
        passes = model.generator.teacher_force(prompt + answer[:-1], len(prompt) - 1)
        rows = torch.cat([logits for _, logits in passes]).log_softmax(-1)
        for t in tokens:
            prob, greedy = (t.prob, t.greedy_id) if packed else (t.reference_prob, t.reference_greedy_id)
            assert prob == pytest.approx(float(rows[t.index, t.token_id].exp()), abs=1e-5)
            assert greedy == int(rows[t.index].argmax())
    assert all(t.kl >= -1e-6 for t in tokens) and any(t.kl > 0 for t in tokens)
    assert all(t.flipped == (t.greedy_id != t.reference_greedy_id) for t in tokens)


def test_quantization_diff_says_when_there_is_nothing_to_compare(tiny_gguf, capsys) -> None:
    code, _, err = _inspect(capsys, tiny_gguf("llama"), "--prompt", "hi", "--max-new-tokens", 2, "--quantization")
    assert code == 2 and "llmchat: error: this model's weights are not packed" in err
