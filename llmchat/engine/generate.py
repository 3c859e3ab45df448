"""Generation: prefill the prompt, then decode one token a step, streaming events.

A request first reuses the longest prefix of its prompt that the KV cache already holds (a new
chat turn costs only its new tokens), prefills the rest in chunks, then decodes. Cancellation is
checked between prefill chunks and between decode steps, so a stop takes effect within one step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from llmchat.engine.errors import ContextFullError
from llmchat.engine.events import (
    Finished,
    FinishReason,
    ForcedPrefix,
    GenerationEvent,
    PrefillDone,
    PrefillProgress,
    TokenEvent,
    TopToken,
)
from llmchat.engine.kv_cache import KVCache
from llmchat.engine.model import Transformer
from llmchat.engine.reasoning import (
    HARMONY_MARKERS,
    HarmonySplitter,
    ReasoningSplitter,
    Split,
    prompt_opens_reasoning,
)
from llmchat.engine.sampling import (
    NATS_PER_BIT,
    Sampler,
    SamplingParams,
    candidate_order,
    entropy,
    exact_top,
    rank_of,
)
from llmchat.engine.threads import ThreadGovernor
from llmchat.engine.tokenizer import StreamDecoder, Tokenizer

DEFAULT_PREFILL_CHUNK = 512
# A hybrid model keeps its recurrent states every this many decoded tokens too (kv_cache.take_snapshot):
# re-reading a step of an answer (the inspector) re-runs at most this many steps from the one before.
SNAPSHOT_EVERY = 64


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class _StopStrings:
    """Holds back streamed text that could still become a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit now, whether a stop string was hit)."""
        self.text += piece
        if not self.stops:
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out, False
        window_start = max(0, self.emitted - max(len(s) for s in self.stops))
        hits = [i for s in self.stops if (i := self.text.find(s, window_start)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out, True
        safe = len(self.text) - self._pending_suffix()
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out

    def _pending_suffix(self) -> int:
        """Length of the longest tail of the text that starts some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class Generator:
    """Owns the model's KV cache and runs requests against it, one at a time."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        tokenizer: Tokenizer,
        *,
        eos_token_ids: Sequence[int] = (),
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        reasoning_markers: tuple[str, str] | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefill_chunk = prefill_chunk
        self.reasoning_markers = reasoning_markers
        self.device = model.device
        self._step_ids = torch.zeros(1, dtype=torch.long, device=self.device)
        self._positions: torch.Tensor | None = None  # arange(vocab), for ranks among equal logits
        self._texts: dict[int, str] = {}
        # Raw logits of the latest request's first step (it came out of prefill) and of its latest
        # step, with the length of the sequence they follow: what `step_logits` cannot recompute
        # exactly, or need not recompute at all.
        self._first_logits: tuple[int, torch.Tensor] | None = None
        self._latest_logits: tuple[int, torch.Tensor] | None = None
        # The last step re-read by step_logits: an inspector asking again (a "what if" with other
        # sampling settings) gets it without a forward pass.
        self._reread_logits: tuple[list[int], torch.Tensor] | None = None
        # decode's thread count, measured (threads.py); the count set now is the most it uses
        self.threads = ThreadGovernor(torch.get_num_threads()) if self.device.type == "cpu" else None

    def token_text(self, token_id: int) -> str:
        """Display text of one token (memoized: the top-k list asks for the same ids often)."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.token_text(token_id)
        return text

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reusable(self, ids: Sequence[int]) -> int:
        """How many leading tokens of a request for `ids` come from the KV cache, not the model.

        The longest common prefix with what is cached, less one when that is all of `ids`: the last
        token must run through the model to give the next token's logits. None of it when the
        sliding-window layers' rings no longer hold the window before it (a rewind further back
        than their slack): everything is prefilled again. A hybrid model's recurrent states exist
        only at the cache's length and its snapshots: the nearest one before (KVCache.resume_point).
        """
        n = min(self.cache.common_prefix(ids), len(ids) - 1) if ids else 0
        return self.cache.resume_point(n)

    @torch.inference_mode()
    def step_logits(self, sequence: Sequence[int], *, prefill: bool = False, fresh: bool = False) -> torch.Tensor:
        """float32 logits [vocab] for the token after `sequence`, as a generation computed them.

        The latest request's first and latest steps are kept, and so is the last step re-read;
        any other step runs its last token through the model again over the cached keys and values
        of the tokens before it, which is the computation its decode step did, and the cache is left
        as it was (that position's keys and values are saved and put back). When the cache no longer
        holds those tokens (another branch was generated since), `prefill=True` prefills them first,
        as the next request on that branch would; otherwise that is a ValueError. `fresh`: run the
        model even when the step's logits are kept, its last token alone (a recurrent model's steps
        from the snapshot before it first): the pass the inspector's layer views observe (inside.py).
        """
        ids = [int(i) for i in sequence]
        n = len(ids)
        if n == 0 or n > self.cache.capacity:
            raise ValueError("that step does not fit in the KV cache")
        held = self.cache.common_prefix(ids)
        # Re-running the step at n - 1 over the cache as it is needs the window before it in the
        # sliding layers' rings, as a request resuming there would. A hybrid's recurrent states are
        # known only at snapshots: the steps from the nearest one before are re-run (and put back).
        recurrent = bool(self.cache.recurrent_layers)
        if held < n - 1 or not (recurrent or self.cache.resumable(n - 1)):
            if not prefill:
                raise ValueError("that step is no longer in the KV cache")
            self._first_logits = self._latest_logits = self._reread_logits = None  # of what was cached
            keep = self.cache.resume_point(min(held, n - 1))
            self.cache.truncate(keep)
            for _ in self._prefill(ids[: n - 1], keep, None):  # run for the keys and values it caches
                pass
            held = n - 1
        if held == n and not fresh:
            for kept in (self._first_logits, self._latest_logits):
                if kept is not None and kept[0] == n:
                    return kept[1]
        if self._reread_logits is not None and self._reread_logits[0] == ids and not fresh:
            return self._reread_logits[1]
        position = n - 1
        begin = self.cache.resume_point(position) if recurrent else position
        # (recurrent states advance even at the cache's length: they are saved and put back too)
        saved = self.cache.save_positions(begin, n) if position < self.cache.length or recurrent else None
        try:
            first = begin
            if first < position and fresh:  # the states up to the step, then the step alone
                steps = torch.tensor(ids[first:position], dtype=torch.long, device=self.device)
                self.model(steps, self.cache, first, last_only=True)
                first = position
            if first == position:
                self._step_ids.fill_(ids[-1])
                logits = self.model(self._step_ids, self.cache, position)[-1].float()
            else:
                steps = torch.tensor(ids[first:], dtype=torch.long, device=self.device)
                logits = self.model(steps, self.cache, first, last_only=True)[-1].float()
            self._reread_logits = (ids, logits)
            return logits
        finally:
            if saved is not None:
                self.cache.restore_positions(begin, n, saved)

    def teacher_force(self, ids: Sequence[int], start: int, *, chunk: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
        """Run ids[start:] through the model after ids[:start] (prefilled first where the cache does not
        hold them), yielding (position of the first row, float32 logits [rows, vocab]) per chunk; the
        cache is left as it was. What the prompt heatmap and an answer's expert routes read: about
        one prefill of those tokens. Rows before `start` (a recurrent model re-runs from a snapshot)
        are not yielded."""
        ids = [int(i) for i in ids]
        n = len(ids)
        if not 0 <= start < n or n > self.cache.capacity:
            raise ValueError("those tokens do not fit in the KV cache")
        recurrent = bool(self.cache.recurrent_layers)
        held = self.cache.common_prefix(ids)
        if held < start or not (recurrent or self.cache.resumable(start)):
            self._first_logits = self._latest_logits = self._reread_logits = None  # of what was cached
            keep = self.cache.resume_point(min(held, start))
            self.cache.truncate(keep)
            if start > keep:
                for _ in self._prefill(ids[:start], keep, None):
                    pass
        begin = self.cache.resume_point(start) if recurrent else start
        saved = self.cache.save_positions(begin, n)
        try:
            for first in range(begin, n, chunk):
                rows = torch.tensor(ids[first : first + chunk], dtype=torch.long, device=self.device)
                logits = self.model(rows, self.cache, first, rope_length=n).float()
                skip = max(0, start - first)
                if skip < logits.shape[0]:
                    yield first + skip, logits[skip:]
        finally:
            self.cache.restore_positions(begin, n, saved)

    def _prefill(
        self, ids: list[int], start: int, cancel: CancelFlag | None
    ) -> Iterator[PrefillProgress | torch.Tensor]:
        """Run ids[start:] through the model in chunks; finally yield the last position's logits."""
        total = len(ids) - start
        position = start
        logits = None
        # A hybrid model's recurrent states are kept where the last token starts: regenerating resumes there.
        snapshot_at = len(ids) - 1 if self.cache.recurrent_layers else -1
        if position == snapshot_at:
            self.cache.take_snapshot()
        while position < len(ids):
            if cancel is not None and cancel.is_set():
                return
            end = min(position + self.prefill_chunk, len(ids))
            chunk = ids[position : snapshot_at if position < snapshot_at < end else end]
            began = time.perf_counter()
            is_last = position + len(chunk) == len(ids)
            tokens = torch.tensor(chunk, dtype=torch.long, device=self.device)
            # rope_length: scalings that depend on the length (longrope, dynamic NTK) see the whole
            # prompt in every chunk, as one unchunked pass would.
            out = self.model(tokens, self.cache, position, last_only=True, rope_length=len(ids))
            if is_last:
                logits = out[-1].float()
            self._sync()
            self.cache.append_tokens(chunk)
            position += len(chunk)
            if position == snapshot_at:
                self.cache.take_snapshot()
            yield PrefillProgress(
                done_tokens=position - start,
                total_tokens=total,
                chunk_tokens=len(chunk),
                chunk_seconds=time.perf_counter() - began,
                cache_tokens=self.cache.length,
                cache_bytes=self.cache.used_bytes,
            )
        assert logits is not None
        yield logits

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        sampling: SamplingParams,
        max_new_tokens: int,
        stop_on_eos: bool = True,
        stop_strings: Sequence[str] = (),
        cancel: CancelFlag | None = None,
        top_k: int = 5,
        live_sampling: Callable[[], SamplingParams] | None = None,
        answer_prefix: Sequence[int] = (),
    ) -> Iterator[GenerationEvent]:
        """Stream events for one request; the last one is always `Finished`.

        `live_sampling`, when given, is asked before every token for the policy to use, so a UI can
        change temperature/top-k/top-p while an answer streams (effective from the next token).
        `answer_prefix`: the answer's first tokens, already chosen (a branch at a token keeps the
        tokens before it and the alternative picked there). They go into the cache with the prompt
        (only what the cache lacks is prefilled) and generation continues after them, up to
        `max_new_tokens` tokens in all (the prefix counts); an end-of-sequence token among them
        ends the answer there.
        """
        prompt = [int(i) for i in prompt_ids]
        prefix = [int(i) for i in answer_prefix]
        if not prompt:
            raise ValueError("the prompt is empty")
        ends_at = next((i for i, t in enumerate(prefix) if stop_on_eos and t in self.eos_token_ids), None)
        if ends_at is not None:
            prefix = prefix[:ends_at]  # the answer ends before its end-of-sequence token
        ids = prompt + prefix
        if len(ids) > self.cache.capacity:
            raise ContextFullError(f"the prompt has {len(ids)} tokens but the context holds {self.cache.capacity}")
        began = time.perf_counter()
        self._first_logits = self._latest_logits = self._reread_logits = None  # the cache changes now
        reused = self.reusable(ids)
        self.cache.truncate(reused)
        prefilled = len(ids) - reused

        logits = None
        chunks: list[tuple[int, float]] = []
        for item in self._prefill(ids, reused, cancel):
            if isinstance(item, torch.Tensor):
                logits = item
            else:
                chunks.append((item.chunk_tokens, item.chunk_seconds))
                yield item
        prefill_seconds = time.perf_counter() - began
        totals = dict(
            prompt_tokens=len(ids), reused_tokens=reused, prefilled_tokens=prefilled, prefill_chunks=tuple(chunks)
        )
        if logits is None:  # cancelled during prefill
            yield self._finished("cancelled", totals, prefill_seconds, 0.0, 0.0, "", [], "")
            return
        self._first_logits = (len(ids), logits)
        yield PrefillDone(
            prompt_tokens=len(ids),
            reused_tokens=reused,
            prefilled_tokens=prefilled,
            seconds=prefill_seconds,
            tokens_per_second=prefilled / prefill_seconds if prefill_seconds > 0 else 0.0,
            cache_tokens=self.cache.length,
            cache_bytes=self.cache.used_bytes,
        )

        sampler = Sampler(sampling, logits.shape[-1], self.device, live=live_sampling is not None)
        sampler.observe(ids)
        decoder = StreamDecoder(self.tokenizer)
        stops = _StopStrings(stop_strings)
        channels = self._splitter(prompt)
        reasoning, content = [], []
        generated: list[int] = []
        reason: FinishReason = "max_new_tokens"
        first_token_at = decode_started = time.perf_counter()
        step_began = began
        k = max(1, min(top_k, logits.shape[-1]))
        ended: FinishReason | None = "eos" if ends_at is not None else None
        snapshots = bool(self.cache.recurrent_layers)
        end_step: TokenEvent | None = None
        governor = self.threads
        if prefix:
            text, hit_stop = stops.feed("".join(decoder.push(t) for t in prefix))
            split = channels.feed(text) if channels else Split(content=text)
            reasoning.append(split.reasoning)
            content.append(split.content)
            yield ForcedPrefix(tuple(prefix), text, split.reasoning, split.content)
            if hit_stop:
                ended = "stop_string"
            elif ended is None and len(prefix) >= max_new_tokens:  # the kept tokens count toward the length
                ended = "max_new_tokens"
        if ended is not None:
            reason = ended
        try:
            while ended is None:
                if live_sampling is not None and (wanted := live_sampling()) is not sampler.params:
                    sampler.update(wanted)
                token, event = self._pick(logits, sampler, k, len(prefix) + len(generated), step_began)
                if not generated:
                    first_token_at = decode_started = time.perf_counter()
                if stop_on_eos and token in self.eos_token_ids:
                    reason = "eos"
                    end_step = TokenEvent(
                        **event,
                        text=self.token_text(token),
                        cache_tokens=self.cache.length,
                        cache_bytes=self.cache.used_bytes,
                    )
                    break
                generated.append(token)
                self._step_ids.fill_(token)
                sampler.observe(self._step_ids)
                text, hit_stop = stops.feed(decoder.push(token))
                split = channels.feed(text) if channels else Split(content=text)
                reasoning.append(split.reasoning)
                content.append(split.content)
                yield TokenEvent(
                    **event,
                    text=text,
                    cache_tokens=self.cache.length,
                    cache_bytes=self.cache.used_bytes,
                    reasoning=split.reasoning,
                    content=split.content,
                )
                if hit_stop:
                    reason = "stop_string"
                    break
                if len(prefix) + len(generated) >= max_new_tokens:
                    reason = "max_new_tokens"
                    break
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if self.cache.free == 0:
                    reason = "context_full"
                    break
                if governor is not None:
                    governor.before_step()
                step_began = time.perf_counter()
                logits = self.model(self._step_ids, self.cache, self.cache.length)[-1].float()
                if governor is not None:
                    governor.after_step(time.perf_counter() - step_began)
                self.cache.append_tokens((token,))
                if snapshots and self.cache.length % SNAPSHOT_EVERY == 0:  # bounds what an inspector re-runs
                    self.cache.take_snapshot()
                self._latest_logits = (self.cache.length, logits)
        finally:  # prefill and the next model start from the configured count again
            if governor is not None:
                governor.finish()
        tail = "" if reason == "stop_string" else stops.feed(decoder.flush())[0] + stops.flush()
        if channels:
            for split in (channels.feed(tail), channels.flush()):
                reasoning.append(split.reasoning)
                content.append(split.content)
        else:
            content.append(tail)
        decode_seconds = time.perf_counter() - decode_started if generated else 0.0
        ttft = first_token_at - began
        done = self._finished(reason, totals, prefill_seconds, decode_seconds, ttft, stops.text, generated, tail)
        yield dataclasses.replace(
            done,
            reasoning="".join(reasoning),
            content="".join(content),
            token_ids=tuple(prefix) + done.token_ids,
            prefix_tokens=len(prefix),
            end_step=end_step,
        )

    def _splitter(self, prompt_ids: list[int]) -> ReasoningSplitter | HarmonySplitter | None:
        """A reasoning splitter for this answer, open already when the prompt ends inside <think>
        (harmony's channels: HarmonySplitter)."""
        if self.reasoning_markers is None:
            return None
        if self.reasoning_markers == HARMONY_MARKERS:
            return HarmonySplitter()
        tail = self.tokenizer.decode(prompt_ids[-16:])
        inside = prompt_opens_reasoning(tail, self.reasoning_markers)
        return ReasoningSplitter(self.reasoning_markers, inside=inside)

    def _pick(self, logits: torch.Tensor, sampler: Sampler, k: int, index: int, step_began: float) -> tuple[int, dict]:
        """Choose the next token and snapshot the top-k alternatives (one host sync per step; a
        second only when equal logits straddle the k-th place). Candidates and rank follow the
        canonical order of sampling.candidate_order, the one greedy's argmax picks by."""
        policy = sampler.policy_logits(logits)
        chosen = sampler.choose(policy)
        log_probs = logits.log_softmax(-1)  # raw distribution and its entropy from one pass over the vocabulary
        raw_probs = log_probs.exp()
        policy_probs = sampler.policy_probs(policy)
        top_logits, top_ids = logits.topk(min(k + 1, logits.shape[-1]))  # one more: is there a tie at the cut?
        if self._positions is None or self._positions.numel() != logits.shape[-1]:
            self._positions = torch.arange(logits.shape[-1], device=logits.device)
        rank = rank_of(logits, chosen, self._positions)
        raw_entropy, policy_entropy = entropy(raw_probs, log_probs), entropy(policy_probs)
        packed = torch.stack(
            (
                chosen.to(logits.dtype), logits[chosen], raw_probs[chosen], policy_probs[chosen],
                rank.to(logits.dtype), raw_entropy, policy_entropy,
            )
        )  # fmt: skip
        snapshot = torch.stack((top_ids.to(logits.dtype), top_logits, raw_probs[top_ids], policy_probs[top_ids]))
        head, table = packed.tolist(), snapshot.T.tolist()
        order = candidate_order([row[1] for row in table], [int(row[0]) for row in table], k)
        if order is None:  # equal logits across the cut: the whole order decides which come in (rare)
            ids = exact_top(logits, k)
            table = torch.stack((ids.to(logits.dtype), logits[ids], raw_probs[ids], policy_probs[ids])).T.tolist()
        else:
            table = [table[i] for i in order]
        token = int(head[0])
        top = tuple(
            TopToken(int(i), self.token_text(int(i)), logit, prob, policy_prob) for i, logit, prob, policy_prob in table
        )
        event = dict(
            token_id=token,
            index=index,
            logit=head[1],
            prob=head[2],
            policy_prob=head[3],
            rank=int(head[4]),
            entropy=head[5] / NATS_PER_BIT,
            policy_entropy=head[6] / NATS_PER_BIT,
            top=top,
            seconds=time.perf_counter() - step_began,
        )
        return token, event

    def _finished(
        self,
        reason: FinishReason,
        totals: dict,
        prefill_seconds: float,
        decode_seconds: float,
        ttft: float,
        text: str,
        generated: list[int],
        tail: str,
    ) -> Finished:
        return Finished(
            reason=reason,
            generated_tokens=len(generated),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            ttft_seconds=ttft,
            text=text,
            tail=tail,
            token_ids=tuple(generated),
            cache_tokens=self.cache.length,
            cache_bytes=self.cache.used_bytes,
            **totals,
        )
