"""The decoding policy: hand-computed cases, bit-for-bit parity with transformers, RNG hygiene."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmchat.engine.sampling import (
    Sampler,
    SamplingParams,
    candidate_order,
    exact_top,
    policy_stages,
    rank_of,
    top_candidates,
)


def _survivors(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def _log(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


# --- hand-built cases ---------------------------------------------------------------------------


def test_top_p_keeps_the_nucleus() -> None:
    # Ascending: 0.05, 0.15, 0.3, 0.5 -> cumulative 0.05, 0.2, 0.5, 1.0.
    logits = _log([0.5, 0.3, 0.15, 0.05])
    # top_p=0.9 removes cumulative <= 0.1: only the 0.05 token.
    out = Sampler(SamplingParams(top_p=0.9), 4).policy_logits(logits)
    assert _survivors(out) == {0, 1, 2}
    # top_p=0.6 removes cumulative <= 0.4: the 0.05 and 0.15 tokens.
    out = Sampler(SamplingParams(top_p=0.6), 4).policy_logits(logits)
    assert _survivors(out) == {0, 1}
    assert out[3].item() == -math.inf
    assert torch.equal(out[:2], logits[:2])  # survivors keep their value


def test_top_p_cut_includes_equality() -> None:
    # Four equal tokens: cumulative 0.25, 0.5, 0.75, 1.0 (exact), so 1 - top_p = 0.5 cuts two.
    out = Sampler(SamplingParams(top_p=0.5), 4).policy_logits(torch.zeros(4))
    assert len(_survivors(out)) == 2


def test_top_p_always_keeps_the_top_token() -> None:
    # 1 - 1e-9 rounds to 1.0 in float32, so every cumulative probability is under the cut.
    logits = _log([0.97, 0.01, 0.01, 0.01])
    out = Sampler(SamplingParams(top_p=1e-9), 4).policy_logits(logits)
    assert _survivors(out) == {0}


def test_top_k() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    out = Sampler(SamplingParams(top_k=2), 4).policy_logits(logits)
    assert _survivors(out) == {1, 2}
    # Ties with the k-th value survive, as in transformers.
    tied = torch.tensor([3.0, 3.0, 3.0, 1.0])
    assert _survivors(Sampler(SamplingParams(top_k=2), 4).policy_logits(tied)) == {0, 1, 2}
    # k larger than the vocab keeps everything.
    assert _survivors(Sampler(SamplingParams(top_k=10), 4).policy_logits(logits)) == {0, 1, 2, 3}


def test_min_p_is_relative_to_the_top_probability() -> None:
    # Threshold 0.1 * 0.6 = 0.06: only the 0.05 token falls below it.
    logits = _log([0.6, 0.1, 0.05, 0.25])
    out = Sampler(SamplingParams(min_p=0.1), 4).policy_logits(logits)
    assert _survivors(out) == {0, 1, 3}
    # Threshold 0.5 * 0.6 = 0.3: only the top token is left.
    out = Sampler(SamplingParams(min_p=0.5), 4).policy_logits(logits)
    assert _survivors(out) == {0}


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5])
    out = Sampler(SamplingParams(temperature=0.5), 3).policy_logits(logits)
    assert out.tolist() == [4.0, -2.0, 1.0]
    out = Sampler(SamplingParams(temperature=2.0), 3).policy_logits(logits)
    assert out.tolist() == [1.0, -0.5, 0.25]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([4.0, -2.0, 1.0, 3.0, 0.0])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), 5)
    sampler.observe([0, 1])  # the prompt
    sampler.observe(torch.tensor([1, 4]))  # generated tokens, one repeated
    out = sampler.policy_logits(logits)
    assert out.tolist() == [2.0, -4.0, 1.0, 3.0, 0.0]
    assert logits.tolist() == [4.0, -2.0, 1.0, 3.0, 0.0]  # the caller's tensor is untouched


def test_observe_ignores_ids_beyond_the_logits_vocab() -> None:
    # Embedding tables can be padded past the lm_head; those ids can never be sampled anyway.
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), 3)
    sampler.observe([2, 3, 1000])
    assert sampler.policy_logits(torch.tensor([1.0, 1.0, 1.0])).tolist() == [1.0, 1.0, 0.5]


def test_disabled_knobs_leave_logits_alone() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(SamplingParams(), 50)
    sampler.observe(list(range(50)))
    assert torch.equal(sampler.policy_logits(logits), logits)


# --- transformers is the reference --------------------------------------------------------------


def _reference_policy(logits: torch.Tensor, params: SamplingParams, context: list[int]) -> torch.Tensor:
    """Build the processors the way transformers' generate() does and run them."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.greedy:  # do_sample=True
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k != 0:
            procs.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
        # generate() adds min-p whenever it is set, 0.0 included.
        procs.append(MinPLogitsWarper(min_p=params.min_p, min_tokens_to_keep=1))
    input_ids = torch.tensor([context], dtype=torch.long)
    return procs(input_ids, logits.unsqueeze(0).clone()).squeeze(0)


def _random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 1.0, rng.uniform(0.05, 3.0)]),
        top_k=rng.choice([0, 1, 2, rng.randint(1, 200)]),
        top_p=rng.choice([1.0, rng.uniform(0.01, 1.0), 0.5]),
        min_p=rng.choice([0.0, rng.uniform(0.0, 1.0), 0.05]),
        repetition_penalty=rng.choice([1.0, rng.uniform(0.5, 2.0)]),
    )


@pytest.mark.parametrize("case", range(300))
def test_policy_logits_match_transformers_bit_for_bit(case: int) -> None:
    pytest.importorskip("transformers")
    rng = random.Random(case)
    vocab = rng.choice([7, 64, 1000, 32_000])
    params = _random_params(rng)
    gen = torch.Generator().manual_seed(case)
    logits = torch.randn(vocab, generator=gen) * rng.uniform(0.5, 12.0)
    if case % 3 == 0:
        logits = (logits * 2).round() / 2  # ties stress top-k and the top-p sort
    context = [rng.randrange(vocab) for _ in range(rng.randint(0, min(3 * vocab, 2000)))]

    sampler = Sampler(params, vocab)
    cut = rng.randint(max(0, len(context) - 100), len(context))
    sampler.observe(context[:cut])  # the prompt...
    for token in context[cut:]:  # ...then one generated token at a time
        sampler.observe(torch.tensor([token]))
    ours = sampler.policy_logits(logits)
    reference = _reference_policy(logits, params, context)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference), params
    stages = policy_stages(logits, params, context)
    assert torch.equal(stages[-1][1], reference)
    if params.greedy:
        assert sampler.choose(ours).item() == int(reference.argmax())


# --- policy_stages ------------------------------------------------------------------------------


def test_policy_stages_names_and_disabled_stages() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5)
    stages = policy_stages(logits, params, context_ids=[0])
    assert [name for name, _ in stages] == [
        "raw",
        "repetition_penalty",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
    ]
    values = dict(stages)
    assert torch.equal(values["raw"], logits)
    assert values["repetition_penalty"].tolist() == pytest.approx([2.0 / 1.5, 1.0, 0.0, -1.0])
    assert torch.equal(values["temperature"], values["repetition_penalty"] / 0.5)
    assert _survivors(values["top_k"]) == {0, 1, 2}
    assert torch.equal(values["top_p"], values["top_k"])  # disabled: unchanged
    assert torch.equal(values["min_p"], values["top_k"])

    sampler = Sampler(params, 4)
    sampler.observe([0])
    assert torch.equal(sampler.policy_logits(logits), values["min_p"])


def test_policy_stages_greedy_stops_after_the_penalty() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    stages = policy_stages(logits, SamplingParams(temperature=0.0, top_k=1, min_p=0.9), [])
    for _, tensor in stages:
        assert torch.equal(tensor, logits)


# --- greedy and the RNG -------------------------------------------------------------------------


def test_greedy_is_argmax_after_the_penalty() -> None:
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.1, repetition_penalty=1.2)
    assert params.greedy
    sampler = Sampler(params, 3)
    logits = torch.tensor([2.0, 1.9, -3.0])
    assert sampler.choose(sampler.policy_logits(logits)).item() == 0
    sampler.observe([0])  # 2.0 / 1.2 = 1.67 < 1.9
    policy = sampler.policy_logits(logits)
    assert torch.isfinite(policy).all()  # no warpers cut anything in greedy mode
    token = sampler.choose(policy)
    assert token.dtype == torch.int64 and token.dim() == 0 and token.item() == 1
    assert sampler.policy_probs(policy).tolist() == [0.0, 1.0, 0.0]


def _draws(params: SamplingParams, n: int = 64) -> list[int]:
    logits = torch.zeros(1000)  # uniform: any RNG difference shows
    sampler = Sampler(params, 1000)
    return [int(sampler.choose(sampler.policy_logits(logits))) for _ in range(n)]


def test_seeded_runs_reproduce_and_different_seeds_differ() -> None:
    assert _draws(SamplingParams(seed=7)) == _draws(SamplingParams(seed=7))
    assert _draws(SamplingParams(seed=7)) != _draws(SamplingParams(seed=8))
    assert _draws(SamplingParams()) != _draws(SamplingParams())  # unseeded: fresh entropy


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    _draws(SamplingParams(seed=3))
    _draws(SamplingParams())
    assert torch.equal(torch.get_rng_state(), state)


def test_choose_returns_a_0d_int64_tensor() -> None:
    sampler = Sampler(SamplingParams(seed=0), 10)
    token = sampler.choose(sampler.policy_logits(torch.randn(10)))
    assert token.dtype == torch.int64 and token.dim() == 0


def test_sampled_frequencies_match_policy_probs() -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -2.0])
    params = SamplingParams(temperature=0.8, top_p=0.85, seed=2024)
    sampler = Sampler(params, 6)
    policy = sampler.policy_logits(logits)
    probs = sampler.policy_probs(policy).double()
    assert (probs == 0).any() and (probs > 0).sum() >= 3  # the test covers a cut and a spread

    n = 20_000
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(n):
        counts[sampler.choose(policy)] += 1

    assert counts[probs == 0].sum() == 0  # cut tokens are never drawn
    kept = probs > 0
    expected = n * probs[kept]
    sigma = (n * probs[kept] * (1 - probs[kept])).sqrt()
    assert ((counts[kept] - expected).abs() <= 4 * sigma).all(), (counts, expected)
    # Chi-square, df = kept - 1 <= 4: the 0.999 quantile is 18.47.
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.47


# --- params -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
    ],
)
def test_validation(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_boundary_values_are_accepted() -> None:
    params = SamplingParams(temperature=0, top_p=1, min_p=1, top_k=0, repetition_penalty=1)
    assert params.greedy and isinstance(params.temperature, float)
    assert isinstance(params.top_p, float) and isinstance(params.repetition_penalty, float)


def test_replace_validates_and_copies() -> None:
    params = SamplingParams(top_k=5)
    changed = params.replace(temperature=0.0)
    assert changed.greedy and changed.top_k == 5 and not params.greedy
    with pytest.raises(ValueError, match="top_p"):
        params.replace(top_p=2.0)


def test_from_generation_config() -> None:
    gen = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": None}
    params = SamplingParams.from_generation_config(gen)
    assert params == SamplingParams(temperature=0.6, top_k=20, top_p=0.95)

    greedy = SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.7})
    assert greedy.greedy

    # Absent keys keep the built-in defaults; an absent do_sample does not force greedy.
    assert SamplingParams.from_generation_config({}) == SamplingParams()

    overridden = SamplingParams.from_generation_config(
        {"do_sample": False, "top_k": 20, "repetition_penalty": 1.1},
        temperature=0.9,
        top_k=None,
        seed=5,
    )
    assert overridden == SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.1, seed=5)

    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config({"top_p": 0.0})


# --- the inspector's view of the chain ----------------------------------------------------------


def test_policy_view_reports_each_stage_by_hand() -> None:
    """Four tokens with p = .5/.3/.15/.05: temperature 1, top-k 3 drops the last (renormalized over
    .95), top-p 0.6 then keeps the two likeliest, min-p 0.5 keeps those whose p >= half the top's."""
    from llmchat.engine.inspector import policy_view

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.6, min_p=0.5)
    view = policy_view(logits, params, lambda i: "abcd"[i], top=4, chosen_id=1)
    stages = {s.name: s for s in view.stages}
    assert [s.name for s in view.stages][0] == "raw" and view.stages[-1].name == "policy"
    assert (stages["top_k"].kept, stages["top_k"].removed, stages["top_k"].removed_shown) == (3, 1, ("d",))
    assert stages["temperature"].active is False and stages["top_k"].setting == "3"
    a, b, c, d = view.candidates
    assert [x.text for x in view.candidates] == ["a", "b", "c", "d"]
    top_k = [s.name for s in view.stages].index("top_k")
    assert a.probs[top_k] == pytest.approx(0.5 / 0.95) and d.probs[top_k] == 0.0
    # top-p 0.6 over (.526, .316, .158): removes tokens whose cumulative mass from the bottom is <= .4
    assert stages["top_p"].kept == 2 and stages["top_p"].removed_shown == ("c",)
    assert view.prob(0) == pytest.approx(0.5 / 0.8) and view.prob(1) == pytest.approx(0.3 / 0.8)
    assert stages["min_p"].removed == 0  # .3/.8 >= .5 * .5/.8
    assert stages["raw"].entropy == pytest.approx(float(-(probs * probs.log2()).sum()), abs=1e-5)
    assert stages["policy"].other == pytest.approx(0.0, abs=1e-6)


def test_policy_view_of_greedy_is_a_one_hot_and_skips_the_warpers() -> None:
    from llmchat.engine.inspector import policy_view

    view = policy_view(torch.tensor([1.0, 3.0, 2.0]), SamplingParams(temperature=0, top_k=1), str, chosen_id=1)
    assert view.prob(1) == 1.0 and view.prob(2) == 0.0
    assert all(not s.active for s in view.stages if s.name in ("temperature", "top_k", "top_p", "min_p"))
    assert view.stages[-1].setting == "greedy: argmax" and view.stages[-1].entropy == 0.0


# --- one order for equal logits: highest first, then lowest id ------------------------------------


def _canonical(logits: torch.Tensor) -> list[int]:
    """The order by hand: (-logit, id)."""
    values = logits.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def _tied_logits(vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Logits on a coarse grid (multiples of 0.125, like bfloat16 output near 25): many ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (vocab,), generator=g).float() * 0.125 + 24


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 8, 64])
def test_top_candidates_order_ties_by_lowest_id(seed: int, k: int) -> None:
    logits = _tied_logits(seed=seed)
    assert top_candidates(logits, k) == _canonical(logits)[:k]
    assert top_candidates(logits, k)[0] == int(logits.argmax()) == _canonical(logits)[0]  # argmax: the first max


def test_candidate_order_asks_for_the_exact_path_only_on_a_tie_across_the_cut() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 5.0, 5.0, 0.0])
    values, ids = logits.topk(3)  # k = 2 with one more: 5, 5, 5 -> the cut splits the tie
    assert candidate_order(values.tolist(), ids.tolist(), 2) is None
    assert exact_top(logits, 2).tolist() == [1, 3]
    values, ids = logits.topk(4)  # k = 3: the fourth (3.0) is lower, the order is known from these
    order = candidate_order(values.tolist(), ids.tolist(), 3)
    assert order is not None and [ids.tolist()[i] for i in order] == [1, 3, 4]


@pytest.mark.parametrize("seed", range(4))
def test_rank_counts_higher_logits_and_equal_ones_of_a_lower_id(seed: int) -> None:
    logits = _tied_logits(seed=seed)
    order = _canonical(logits)
    for chosen in range(logits.numel()):
        assert int(rank_of(logits, torch.tensor(chosen))) == order.index(chosen)
    assert int(rank_of(logits, torch.tensor(5), torch.arange(logits.numel()))) == order.index(5)
