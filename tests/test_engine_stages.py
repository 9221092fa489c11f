"""The engine by stage (#24 item 1) and RAG assembly that does not starve decoding (#28 item 2).

CPU, the default model. The detokenizer is incremental (each token decodes a few tokens, not the whole
output); a short request keeps decoding at a bounded inter-token latency while a long `/query` request
is assembled and prefilled beside it; an assembly whose client left stops and frees its pages.
"""

from __future__ import annotations

import threading
import time

import pytest

from redknot_rag.engine.detokenizer import Detokenizer
from redknot_rag.sampling import SamplingParams

TEXTS = [
    "Plain ASCII text, with punctuation: done.",
    "日本語のテキストと絵文字 🎉🚀 が混ざった文 — ünïcödé façade.",
    "Emoji run: 👩‍👩‍👧‍👦🏳️‍🌈🧑🏽‍🚀 and CJK 漢字かな交じり文 then ASCII.",
]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_deltas_equal_full_decode(engine, text):
    """Token by token, the deltas concatenate to the full decode, and none carries a replacement
    character although multi-byte characters are split over tokens."""
    tok = engine.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    d = Detokenizer(tok)
    deltas = [d.push(t) for t in ids]
    deltas.append(d.flush())
    assert "".join(deltas) == tok.decode(ids) == d.text
    assert not any("\ufffd" in x for x in deltas)
    if not text.isascii():  # some character really is split over tokens
        assert any("\ufffd" in tok.decode([t]) for t in ids)


def test_output_stage_decodes_a_bounded_window_per_token(engine, monkeypatch):
    """A 300-token output decodes O(output) token ids in total, not O(output^2) (the full re-decode
    per token decoded 45,150 ids here)."""
    decoded = [0]
    inner = engine.tokenizer.decode

    def counting(ids, *a, **kw):
        decoded[0] += len(ids)
        return inner(ids, *a, **kw)

    monkeypatch.setattr(engine.tokenizer, "decode", counting)
    (r,) = engine.generate([[1, 504, 3000, 2000]], SamplingParams(max_new_tokens=300, ignore_eos=True))
    assert len(r.output_ids) == 300
    assert decoded[0] <= 10 * 300, decoded[0]
    monkeypatch.undo()
    assert r.output_text == engine.tokenizer.decode(r.output_ids)


DOC = (
    "Record {i} of the harbour ledger. The ship number {i} left the dock at dawn carrying salt, rope, "
    "lamp oil and letters for the northern islands. Its captain wrote that the wind was steady, the sea "
    "calm, and that the crew of {i} sailors sang while they worked the sails. At noon they passed the "
    "lighthouse of Varn, whose lamp burns whale oil, and at dusk they anchored in the bay of Mirdell. "
)


@pytest.fixture(scope="module")
def looping(loaded_default, tmp_path_factory):
    """A RAG service over its own engine with a loop thread (as the server runs it), 12 stored chunks."""
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine
    from redknot_rag.rag import RagService

    eng = Engine(EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.5), loaded=loaded_default)
    eng.start()
    root = tmp_path_factory.mktemp("stages")
    svc = RagService(eng, root / "data", "naive", chunk_tokens=256, overlap_tokens=0)
    docs = [{"doc_id": f"d{i}", "text": DOC.format(i=i) * 2} for i in range(12)]
    s = svc.ingest_texts(docs, "ns")
    assert s.kv_chunks == 12
    yield svc
    eng.shutdown()


def _gaps_within(times: list[float], t0: float, t1: float) -> list[float]:
    """Inter-token gaps of `times` that overlap the window [t0, t1]."""
    return [b - a for a, b in zip(times, times[1:]) if b >= t0 and a <= t1]


def test_short_request_keeps_decoding_while_a_long_query_assembles(looping):
    """While a `/query` over 12 chunks (~2,200 tokens, 90% recomputed) is assembled and prefilled, a short
    request decoding beside it waits at most a quarter of that query's time to first token between two
    tokens. Before the engine split, the query's recompute went into one forward: the short request then
    stalled for most of the query's time to first token."""
    eng = looping.engine
    short = eng.submit(eng.make_request([1, 504, 3000, 2000], SamplingParams(max_new_tokens=2000, ignore_eos=True)))
    while len(short.output_ids) < 5:
        time.sleep(0.01)
    solo = _gaps_within(short.token_times, 0, float("inf"))
    t0 = time.perf_counter()
    prep = looping.prepare(
        "Which ship anchored in the bay of Mirdell?",
        top_k=12,
        namespace="ns",
        reuse_policy="epic-frac:0.9",
        params=SamplingParams(max_new_tokens=1),
    )
    q = eng.submit(prep.request)
    q.done.wait(600)
    eng.abort(short.rid)
    short.done.wait(60)
    assert q.error is None and q.first_token_time is not None
    assert prep.request.prompt_len > 2000 and prep.stats["recomputed_tokens"] > 1800
    ttft = q.first_token_time - t0
    gaps = _gaps_within(short.token_times, t0, q.first_token_time)
    assert gaps, "the short request produced no token while the query ran"
    assert max(gaps) < ttft / 4, (max(gaps), ttft, sorted(solo)[len(solo) // 2])


def test_cancelled_assembly_stops_and_frees_its_pages(looping):
    """An assembly whose client left stops at its next stage: `AssemblyCancelled`, no request, and the
    pool's free pages are back where they were, once the segments the cache newly holds are counted."""
    from redknot_rag.engine import AssemblyCancelled

    eng = looping.engine
    cache = looping.assembler.cache
    while eng.has_work():
        time.sleep(0.01)
    free, cached = eng.runner.allocator.num_free, cache.num_pages
    cancel = threading.Event()
    inner = looping.assembler.segments

    def leaving_segments(chunk_ids, timing):
        cancel.set()  # the client leaves while the chunks load
        return inner(chunk_ids, timing)

    looping.assembler.segments = leaving_segments  # type: ignore[method-assign]
    try:
        with pytest.raises(AssemblyCancelled):
            looping.prepare("Who sang?", top_k=6, namespace="ns", reuse_policy="epic-frac:0.5", cancel=cancel)
    finally:
        del looping.assembler.segments
    assert not eng.has_work()
    assert eng.runner.allocator.num_free + (cache.num_pages - cached) == free
