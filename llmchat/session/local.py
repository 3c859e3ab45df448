"""llmchat's own engine in this process, behind the session calls.

`LocalSession` owns what the chat used to keep next to the model: the lock that lets one thread at a
time use the model and its KV cache (the answer's worker, or an inspector's), the chat tokens that
keep a conversation's ids stable from turn to turn (engine/prompt.py), and each answer's prompt ids
as the engine got them. The UI calls it from worker threads; nothing here touches Textual.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llmchat.engine.chat_template import default_system_prompt
from llmchat.engine.errors import LLMChatError
from llmchat.engine.events import Finished
from llmchat.engine.prompt import COMPLETION, ChatTokens, PromptMode, request_text
from llmchat.engine.sampling import SamplingParams
from llmchat.session.base import CacheStats, Capabilities, SessionInfo

if TYPE_CHECKING:
    from llmchat.engine.inside import AnswerExperts, PromptToken, QuantizedToken, StepInside
    from llmchat.engine.inspector import PolicyView, PromptView
    from llmchat.engine.memory import MemoryEstimate, MemoryUsage
    from llmchat.engine.runtime import LoadedModel


class LocalSession:
    """A loaded model (llmchat.load) as a session."""

    def __init__(self, model: LoadedModel, *, top_k: int) -> None:
        self.model = model
        # re-entrant: the answer's worker, holding it, computes the live policy view at a UI frame
        self._lock = threading.RLock()
        self._chat_tokens = ChatTokens(model.tokenizer)
        self._prompt_ids: dict[str, list[int]] = {}  # each answer's prompt as the engine got it
        self._reference: LoadedModel | None = None  # the float32 reference, once quantization_diff asked for it
        self.capabilities = Capabilities(
            top_k=top_k,
            probabilities="raw softmax and after the sampling policy",
            reread_steps=True,
            branch_at_token=True,
            kv_cache=True,
            memory=True,
            prompt_tokens=True,
            layer_views=True,
        )
        quant = model.package.quantization
        if quant != "none" and model.info.packing != "float":
            quant += " packed"  # int4/int8 kernels (see `llmchat info`), not dequantized floats
        precision = str(model.dtype).removeprefix("torch.") + (f" · {quant}" if quant != "none" else "")
        self.info = SessionInfo(
            name=model.package.name,
            path=str(model.package.path),
            kind=model.traits.kind,
            labels=tuple(model.traits.labels),
            chat=model.traits.chat,
            context_length=model.context_length,
            device=model.device.type,
            precision=precision,
            default_sampling=model.default_sampling,
        )

    # --- answering -----------------------------------------------------------------------------------

    def answer(
        self,
        messages: list[dict[str, Any]],
        *,
        answer_id: str,
        mode: PromptMode,
        sampling: SamplingParams,
        live_sampling: Callable[[], SamplingParams] | None = None,
        cancel: Any = None,
        max_new_tokens: int | None = None,
        answer_prefix: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
    ) -> Iterator[Any]:
        """Stream the events of one answer to `messages` (the model is this caller's until the last one)."""
        with self._lock:
            ids = self._chat_tokens.encode(request_text(self.model, messages, mode), mode)
            self._prompt_ids[answer_id] = ids
            for event in self.model.generate(
                ids,
                sampling=sampling,
                live_sampling=live_sampling,
                cancel=cancel,
                top_k=self.capabilities.top_k,
                max_new_tokens=max_new_tokens,
                answer_prefix=answer_prefix,
                stop_strings=stop_strings,
            ):
                if isinstance(event, Finished):
                    self._chat_tokens.generated(event.text, event.token_ids)
                yield event

    def prompt_tokens(self, messages: list[dict[str, Any]], mode: PromptMode) -> list[int]:
        """The ids the next answer to `messages` will be given (nothing is run or remembered)."""
        with self._lock:
            return self._chat_tokens.peek(request_text(self.model, messages, mode), mode)

    def prompt_ids(self, answer_id: str | None) -> list[int] | None:
        """The prompt an answer was generated from, as the engine got it (None: not this session's)."""
        return self._prompt_ids.get(answer_id or "")

    def token_text(self, token_id: int) -> str:
        """A token as text (what the top-k lists and the inspector show)."""
        return self.model.generator.token_text(token_id)

    def forget_prompts(self) -> None:
        """Another conversation is shown: its answers' prompts are not these."""
        self._prompt_ids.clear()

    # --- the inspector -------------------------------------------------------------------------------

    def policy_view(
        self,
        prompt_ids: list[int] | None,
        messages: list[dict[str, Any]] | None,
        answer_ids: list[int],
        params: SamplingParams,
        chosen: int,
        mode: PromptMode,
    ) -> PolicyView:
        """The sampler chain of one step of an answer (another branch's step is prefilled back; asking
        again, a what-if, runs no model). ValueError / LLMChatError when the step cannot be had."""
        from llmchat.engine.inspector import policy_view

        generator = self.model.generator
        with self._lock:
            if prompt_ids is None:
                prompt_ids = self._chat_tokens.peek(request_text(self.model, messages or [], mode), mode)
            sequence = prompt_ids + answer_ids
            logits = generator.step_logits(sequence, prefill=True)
            return policy_view(logits, params, generator.token_text, context_ids=sequence, top=10, chosen_id=chosen)

    def live_policy_view(self, sequence: list[int], chosen: int, params: SamplingParams) -> PolicyView:
        """The step the answer's worker just sampled (its logits are the generator's latest)."""
        from llmchat.engine.inspector import policy_view

        generator = self.model.generator
        with self._lock:
            logits = generator.step_logits(sequence)
            return policy_view(logits, params, generator.token_text, context_ids=sequence, top=10, chosen_id=chosen)

    def prompt_view(self, messages: list[dict[str, Any]], mode: PromptMode) -> PromptView:
        """The next request as the model will see it: its text, tokens, and what the cache reuses."""
        from llmchat.engine.inspector import PromptView

        generator = self.model.generator
        with self._lock:
            rendered = request_text(self.model, messages, mode)
            ids = self._chat_tokens.peek(rendered, mode)
            reused = generator.reusable(ids)
            texts = tuple(generator.token_text(i) for i in ids)
        return PromptView(rendered, tuple(ids), texts, reused, completion=mode == COMPLETION)

    def inside_step(self, prompt_ids: list[int], answer_ids: list[int], index: int) -> StepInside:
        """The layer views of answer step `index` (the pass that chose answer_ids[index]; index
        len(answer_ids): the step after the answer, e.g. the one that chose to end it): about one
        decode step, re-read over the KV cache (another branch's steps are prefilled back first)."""
        from llmchat.engine.inside import inside_step

        if not 0 <= index <= len(answer_ids):
            raise ValueError(f"the answer has no step {index} (it has {len(answer_ids)} tokens)")
        chosen = answer_ids[index] if index < len(answer_ids) else None
        with self._lock:
            return inside_step(self.model.generator, prompt_ids + answer_ids[:index], chosen)

    def prompt_heatmap(self, prompt_ids: list[int]) -> tuple[PromptToken, ...]:
        """How likely the model found every prompt token given the ones before: one prefill of the prompt."""
        from llmchat.engine.inside import prompt_heatmap

        with self._lock:
            return prompt_heatmap(self.model.generator, prompt_ids)

    def answer_experts(self, prompt_ids: list[int], answer_ids: list[int]) -> AnswerExperts:
        """The experts every answer token was routed to, and each layer's load: one prefill of the answer."""
        from llmchat.engine.inside import answer_experts

        with self._lock:
            return answer_experts(self.model.generator, prompt_ids, answer_ids)

    def quantization_diff(
        self, prompt_ids: list[int], answer_ids: list[int], progress: Callable[[int, int], object] | None = None
    ) -> tuple[QuantizedToken, ...]:
        """An answer of packed weights against the float32 reference of the same file: per token the KL
        divergence, the chosen token's rank under each, where greedy flips. The reference is loaded on
        the first call (`progress(done, total)` per tensor read) and kept for the next."""
        from llmchat.engine.inside import quantization_diff
        from llmchat.engine.runtime import load

        if self.model.info.packing == "float":
            raise ValueError("this model's weights are not packed: there is no quantization to compare")
        needed = len(prompt_ids) + len(answer_ids)
        with self._lock:
            if self._reference is None or self._reference.context_length < needed:
                self._reference = None  # one reference at a time: it is a float32 copy of the model
                self._reference = load(
                    self.model.package.path,
                    self.model.device,
                    "float32",
                    context_length=max(needed, self.model.context_length),
                    packed=False,
                    progress=progress,
                )
            return quantization_diff(self.model.generator, self._reference.generator, prompt_ids, answer_ids)

    def default_system_prompt(self) -> str | None:
        """What the chat template writes when a conversation has no system prompt (None: nothing)."""
        if not self.info.chat:
            return None
        try:
            return default_system_prompt(self.model.template)
        except LLMChatError:
            return None

    # --- panels --------------------------------------------------------------------------------------

    def cache_stats(self) -> CacheStats:
        cache = self.model.cache
        return CacheStats(
            tokens=cache.length,
            capacity=cache.capacity,
            used_bytes=cache.used_bytes,
            capacity_bytes=cache.nbytes,
            state_bytes=cache.state_bytes + cache.snapshot_bytes,
        )

    def memory(self) -> tuple[MemoryEstimate, MemoryUsage]:
        """The memory bill: predicted, and measured now."""
        return self.model.memory_estimate(), self.model.memory_usage()

    def close(self) -> None:
        """Nothing to release but memory, which goes with the session (the chat may load another model)."""
        self._reference = None
