"""The output stage: a step's logits → prompt logprobs, sampled tokens, streamed text, stops.

Per token its cost does not grow with the output: the text grows through an incremental
`Detokenizer`, and stop strings are searched only in the tail of the text that a new token can
have completed them in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from redknot_rag.engine.batch_builder import BuiltBatch, RowPlan
from redknot_rag.engine.detokenizer import Detokenizer
from redknot_rag.request import Request, RequestStatus, TokenEvent
from redknot_rag.sampling import apply_penalties, sample_token

if TYPE_CHECKING:
    from redknot_rag.engine.grammar import StepGrammarMask

log = logging.getLogger("redknot.engine")

# (request, finish reason, error): ends a request (the scheduler releases its pages, the stream ends)
Finish = Callable[[Request, dict, "str | None"], None]


def is_fast(req: Request) -> bool:
    """Whether the next token is plain argmax (no logprobs, penalties, constraints, min length)."""
    p = req.params
    return (
        p.is_greedy
        and not req.return_logprob
        and req.logits_processor is None
        and p.frequency_penalty == 0
        and p.presence_penalty == 0
        and p.repetition_penalty == 1
        and len(req.output_ids) >= p.min_new_tokens
    )


def topk(lp: torch.Tensor, k: int) -> list[tuple[float, int]]:
    v, i = lp.topk(k)
    return [(float(a), int(b)) for a, b in zip(v, i)]


def start_grammar_masks(built: BuiltBatch) -> StepGrammarMask | None:
    """Start filling, on a worker thread, one bitmask `[num_rows, ceil(vocab/32)]` for every request
    of this step that samples under a grammar (`StepGrammarMask`); None if there is none."""
    if all(rp.req.logits_processor is None for rp in built.rows):
        return None
    from redknot_rag.engine.grammar import GrammarProcessor, StepGrammarMask  # xgrammar: only when used

    members = []
    for rp in built.rows:
        proc = rp.req.logits_processor
        if not (rp.completes and isinstance(proc, GrammarProcessor)):
            continue
        try:
            if proc.sync(rp.req.output_ids):  # dead/terminated ones allow only stop tokens: no mask
                members.append((proc, rp.rows[-1], len(rp.req.output_ids)))
        except Exception:  # its own call in `emit` fails it alone
            log.exception("grammar sync failed", extra={"rid": rp.req.rid})
    if not members:
        return None
    return StepGrammarMask(members, built.num_logit_rows, members[0][0].vocab_size).start()


class OutputStage:
    """Turns a step's logits into tokens and text for each request of the step."""

    def __init__(self, tokenizer, eos_token_ids: list[int] | tuple[int, ...], finish: Finish) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.finish = finish

    def process(self, built: BuiltBatch, out: torch.Tensor, step_mask: StepGrammarMask | None) -> None:
        """`out`: the step's logits `[M, vocab]` float32 on the model's device, M = len(logit_rows)."""
        # Greedy requests without logprobs/penalties/constraints only need the argmax: skip moving
        # [M, vocab] logits to the host (at batch 64 x 128K vocab that dominated the decode step).
        needs_logits = any((not is_fast(rp.req)) or any(t >= 0 for t in rp.targets) for rp in built.rows)
        greedy = out.argmax(-1).tolist() if out.shape[0] else []
        logits = out.cpu() if needs_logits else None
        if step_mask is not None and logits is not None:
            try:
                step_mask.apply(logits)  # one call for every constrained row
            except Exception:  # each processor then masks its own row, and a failure fails it alone
                log.exception("batch grammar mask failed")
        now = time.perf_counter()
        for rp in built.rows:
            self._request(rp, logits, greedy, now)

    def _request(self, rp: RowPlan, logits: torch.Tensor | None, greedy: list[int], now: float) -> None:
        req = rp.req
        was_prefill = not req.is_prefill_done
        if was_prefill:
            if req.return_logprob and req.logprob_start_len >= 0 and req.num_computed == 0 and rp.num_tokens:
                if req.logprob_start_len == 0:  # the first token has no context; report 0.0
                    req.input_token_logprobs.append((0.0, req.prompt_ids[0]))
                    req.input_top_logprobs.append([])
            for li, tgt in zip(rp.rows, rp.targets):
                if tgt >= 0:
                    assert logits is not None
                    lp = logits[li].log_softmax(-1)
                    req.input_token_logprobs.append((float(lp[tgt]), tgt))
                    if req.top_logprobs_num > 0:
                        req.input_top_logprobs.append(topk(lp, req.top_logprobs_num))
            req.num_computed += rp.num_tokens
        if not rp.completes:
            return
        if was_prefill and req.params.max_new_tokens == 0:
            self.finish(req, {"type": "length", "length": 0}, None)
            return
        if was_prefill:
            req.status = RequestStatus.DECODE
        if logits is None:
            self.emit(req, None, now, token=greedy[rp.rows[-1]])
        else:
            self.emit(req, logits[rp.rows[-1]], now)

    def emit(self, req: Request, logits: torch.Tensor | None, now: float, token: int | None = None) -> None:
        """`sample_next`, isolated: a sampler or logits-processor error fails `req` alone, with its own
        error event, and the other requests of the batch go on."""
        try:
            self.sample_next(req, logits, now, token)
        except Exception as e:
            log.exception("request failed while sampling", extra={"rid": req.rid})
            if not req.is_finished:
                self.finish(req, {"type": "abort"}, f"{type(e).__name__}: {e}")

    def sample_next(self, req: Request, logits: torch.Tensor | None, now: float, token: int | None = None) -> None:
        """Sample the next token of `req` from its logits `[vocab]` (or take the precomputed greedy
        `token` on the fast path) and check stop conditions."""
        p = req.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        if logits is None:
            assert token is not None
            self.accept(req, token, None, stop_ids, now)
            return
        logits = apply_penalties(logits, p, req.output_ids)
        if len(req.output_ids) < p.min_new_tokens and stop_ids:
            masked = logits.clone()
            masked[[t for t in stop_ids if t < masked.shape[-1]]] = float("-inf")
            if masked.amax() > float("-inf"):  # stops covering every token: the stop wins, never a NaN
                logits = masked
        if req.logits_processor is not None:  # constrained decoding, observers
            logits = req.logits_processor(req, logits)
        tok = sample_token(logits, p, req.generator)
        lp = logits.log_softmax(-1)
        if req.return_logprob:
            req.output_token_logprobs.append((float(lp[tok]), tok))
            if req.top_logprobs_num > 0:
                req.output_top_logprobs.append(topk(lp, req.top_logprobs_num))
        self.accept(req, tok, float(lp[tok]), stop_ids, now)

    def _detokenizer(self, req: Request) -> Detokenizer:
        d = req.detokenizer
        if d is None:
            d = req.detokenizer = Detokenizer(self.tokenizer, req.params.skip_special_tokens)
        return d

    def accept(self, req: Request, tok: int, logprob: float | None, stop_ids: set[int], now: float) -> None:
        """Append a sampled token, extend the streamed text and finish on stop/length.

        Invariant: `req.output_text` is a prefix of the detokenizer's text; what lies beyond it is held
        back (an incomplete character, or a possible start of a stop string)."""
        p = req.params
        req.output_ids.append(tok)
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_times.append(now)
        reason: dict | None = None
        detok = self._detokenizer(req)
        seen = len(detok.text)
        if tok in stop_ids:
            reason = {"type": "stop", "matched": tok}  # the stop token itself is not text
        else:
            detok.push(tok)
        stops = [s for s in p.stop if s] if p.stop else []
        cut = -1
        if stops and reason is None:
            # a stop string the new text completed starts at most len(s) - 1 characters before it
            longest = max(len(s) for s in stops)
            lo = max(0, seen - longest + 1)
            window = detok.text[lo:]
            hits = [(i, s) for s in stops if (i := window.find(s)) >= 0]
            if hits:
                i, s = min(hits)
                cut = lo + i
                reason = {"type": "stop", "matched": s}
        if reason is None and len(req.output_ids) >= p.max_new_tokens:
            reason = {"type": "length", "length": p.max_new_tokens}
        if reason is not None and cut < 0:
            detok.flush()  # the request ends: a held incomplete character is emitted as it is
        text = detok.text if cut < 0 else detok.text[:cut]
        # hold back a possible partial stop string at the end of the streamed text
        hold = 0
        if reason is None and stops:
            for s in stops:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        visible = text[: len(text) - hold] if hold else text
        delta = visible[len(req.output_text) :] if len(visible) > len(req.output_text) else ""
        if delta:
            req.output_text = visible
        req.events.put(TokenEvent(tok, delta, logprob))
        if reason is not None:
            self.finish(req, reason, None)
