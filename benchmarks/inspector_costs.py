"""What the inspector costs on the demo model: a policy what-if, a re-read step, a branch.

    python benchmarks/inspector_costs.py [--model demo] [--tokens 64]

Loads the model, samples an answer, then times: the entropy of both distributions per step (what
every TokenEvent carries, with the engine's own `entropy`), `step_logits` of a middle step (one
forward), `policy_view` over the whole vocabulary (the "what if" of the policy tab), and a branch at
that step with the cache warm vs empty.
Also checks that the policy view's probability of the chosen token is the sampler's.
"""

from __future__ import annotations

import argparse
import time

from llmchat.engine import SamplingParams, load
from llmchat.engine.events import Finished, TokenEvent
from llmchat.engine.inspector import policy_view
from llmchat.engine.sampling import Sampler, entropy
from llmchat.models import resolve_model
from llmchat.paths import cache_dir

QUESTION = "What is the capital of France? Tell me three things to see there."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    model = load(resolve_model(args.model), cache_dir=cache_dir() / "packed")
    messages = [{"role": "user", "content": QUESTION}]
    ids = model.tokenizer.encode(model.template.render(messages, add_generation_prompt=True))
    sampling = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=11)
    events = list(model.generate(ids, sampling=sampling, max_new_tokens=args.tokens, stop_on_eos=False))
    steps = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, Finished)
    generator = model.generator

    # The entropies every step computes (engine.sampling.entropy), on a real step's distributions.
    raw = generator.step_logits(ids)
    log_probs = raw.log_softmax(-1)
    policy = Sampler(sampling, raw.shape[-1])
    policy_probs = policy.policy_probs(policy.policy_logits(raw))
    began = time.perf_counter()
    for _ in range(200):
        entropy(log_probs.exp(), log_probs), entropy(policy_probs)
    print(f"raw probabilities and both entropies, per step: {(time.perf_counter() - began) / 200 * 1e6:.0f} us")

    i = len(steps) // 2
    sequence = ids + list(done.token_ids[:i])
    began = time.perf_counter()
    step = generator.step_logits(sequence)
    print(f"step_logits of step {i} (one forward): {(time.perf_counter() - began) * 1000:.1f} ms")
    for _ in range(3):
        began = time.perf_counter()
        view = policy_view(step, sampling, generator.token_text, context_ids=sequence, chosen_id=steps[i].token_id)
        spent = time.perf_counter() - began
    print(
        f"policy_view over {model.config.vocab_size:,} logits: {spent * 1000:.1f} ms; chosen token's policy p "
        f"{view.prob(steps[i].token_id):.6f}, the sampler's {steps[i].policy_prob:.6f}"
    )

    pick = next(t.token_id for t in steps[i].top if t.token_id != steps[i].token_id)
    prefix = list(done.token_ids[:i]) + [pick]
    one_more = len(prefix) + 1  # the prefix counts toward max_new_tokens: one new token after it
    warm = list(model.generate(ids, sampling=sampling, max_new_tokens=one_more, answer_prefix=prefix))[-1]
    model.reset()
    cold = list(model.generate(ids, sampling=sampling, max_new_tokens=one_more, answer_prefix=prefix))[-1]
    assert isinstance(warm, Finished) and isinstance(cold, Finished)
    print(
        f"branch at token {i}: prefilled {warm.prefilled_tokens} (reused {warm.reused_tokens}), first new token "
        f"after {warm.ttft_seconds * 1000:.0f} ms; on an empty cache: prefilled {cold.prefilled_tokens}, "
        f"{cold.ttft_seconds * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
