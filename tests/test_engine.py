"""Engine core: our forward against transformers, batching invariance, page accounting, bad input."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from redknot_rag.chat import chat_prompt_ids
from redknot_rag.kvcache import PageAllocator
from redknot_rag.loader import ModelLoadError, default_model_path, load_model
from redknot_rag.sampling import InvalidRequestError, SamplingParams


def _prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    kv = engine.runner.new_seq_kv()
    try:
        return engine.runner.append_forward(kv, ids, torch.arange(len(ids)), logits=True).logits
    finally:
        engine.runner.release(kv)


def test_logits_match_transformers_512(engine, hf_default):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, engine.model_config.vocab_size, (512,), generator=g).tolist()
    ours = _prefill_logits(engine, ids)
    with torch.no_grad():
        ref = hf_default(torch.tensor([ids])).logits[0].float()
    diff = (ours - ref).abs().max().item()
    print(f"max |logit diff| vs transformers (fp32, 512 tokens): {diff:.2e}")
    assert diff < 1e-3


def test_greedy_64_tokens_match_transformers(engine, hf_default):
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": "Write a short poem about the sea."}])
    req = engine.generate([ids], SamplingParams(max_new_tokens=64, ignore_eos=True))[0]
    with torch.no_grad():
        out = hf_default.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64)
    assert req.output_ids == out[0, len(ids) :].tolist()
    assert len(req.output_ids) == 64


def test_concurrent_equals_sequential(engine):
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(5, 300))] for _ in range(16)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    free = engine.runner.free_pages  # other test modules' services may hold pages of this shared engine
    single = [engine.generate([p], params)[0].output_ids for p in prompts]
    together = [r.output_ids for r in engine.generate(prompts, params)]
    assert single == together
    assert engine.runner.free_pages == free


def test_chunked_prefill_matches_whole(engine, loaded_default):
    from redknot_rag.config import EngineConfig
    from redknot_rag.engine import Engine

    small = Engine(
        EngineConfig(device="cpu", dtype="float32", cpu_kv_gib=0.1, max_prefill_tokens=37), loaded=loaded_default
    )
    rng = random.Random(2)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (150, 90, 3)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    assert [r.output_ids for r in small.generate(prompts, params)] == [
        r.output_ids for r in engine.generate(prompts, params)
    ]


def test_thousand_requests_leave_pool_empty(engine):
    rng = random.Random(3)
    before = engine.runner.free_pages
    reqs = []
    for i in range(1000):
        p = [rng.randrange(100, 40000) for _ in range(rng.randrange(1, 40))]
        r = engine.make_request(p, SamplingParams(max_new_tokens=rng.randrange(0, 3), ignore_eos=True))
        reqs.append(engine.submit(r))
        if i % 7 == 0:
            engine.abort(r.rid)
        if i % 50 == 49:
            engine.step()
            assert (engine.runner.allocator.refcount >= 0).all()
    while engine.has_work():
        engine.step()
        assert (engine.runner.allocator.refcount >= 0).all()
    assert all(r.is_finished for r in reqs)
    assert engine.runner.free_pages == before
    assert engine._reserved_pages == 0


def test_allocator_refcounts():
    a = PageAllocator(8)
    ids = a.allocate(3)
    a.incref(ids[:1])
    a.decref(ids)
    assert a.num_free == 7  # the increfed page is still held once
    a.decref(ids[:1])
    assert a.num_free == 8
    with pytest.raises(RuntimeError):
        a.decref(ids[:1])


def test_input_logprobs_match_transformers(engine, hf_default):
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    req = engine.generate(
        [ids], SamplingParams(max_new_tokens=0), return_logprob=True, logprob_start_len=0, top_logprobs_num=2
    )[0]
    with torch.no_grad():
        lp = hf_default(torch.tensor([ids])).logits[0].log_softmax(-1)
    ref = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    got = [x for x, _ in req.input_token_logprobs]
    assert len(got) == len(ids) and got[0] == 0.0
    assert max(abs(a - b) for a, b in zip(got[1:], ref)) < 1e-3
    assert len(req.input_top_logprobs) == len(ids)


def test_sampling_seed_stop_and_topk(engine):
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": "Tell me a story."}])
    p = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    a, b = engine.generate([ids, ids], [p, p])
    assert a.output_ids == b.output_ids
    greedy = engine.generate([ids], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    top1 = engine.generate([ids], SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=3, ignore_eos=True))[
        0
    ]
    assert greedy.output_ids == top1.output_ids
    word = greedy.output_text.split()[2]
    stopped = engine.generate([ids], SamplingParams(max_new_tokens=16, stop=(word,), ignore_eos=True))[0]
    assert stopped.finish_reason == {"type": "stop", "matched": word}
    assert word not in stopped.output_text
    assert greedy.output_text.startswith(stopped.output_text)


def test_streaming_events_concatenate_to_text(engine):
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": "Count to five."}])
    req = engine.submit(engine.make_request(ids, SamplingParams(max_new_tokens=20)))
    while not req.is_finished:
        engine.step()
    events = []
    while not req.events.empty():
        events.append(req.events.get())
    assert events[-1].finished
    assert "".join(e.text for e in events) == req.output_text


@pytest.mark.parametrize(
    "prompt,params,msg",
    [
        ([], SamplingParams(), "empty prompt"),
        ([5] * 9000, SamplingParams(), "context"),
        ([5, 6], SamplingParams(max_new_tokens=-1), "max_new_tokens"),
        ([5, 6], SamplingParams(top_p=0), "top_p"),
        ([10**9], SamplingParams(), "token ids"),
    ],
)
def test_bad_requests_rejected_engine_keeps_serving(engine, prompt, params, msg):
    with pytest.raises(InvalidRequestError, match=msg):
        engine.make_request(prompt, params)
    ok = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, ignore_eos=True))[0]
    assert len(ok.output_ids) == 2


def test_failing_batch_fails_only_its_requests(engine, monkeypatch):
    free = engine.runner.free_pages
    r = engine.submit(engine.make_request([1, 2, 3], SamplingParams(max_new_tokens=4)))
    real = engine.runner.model.forward

    def boom(*a, **k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.runner.model, "forward", boom)
    engine.step()
    monkeypatch.setattr(engine.runner.model, "forward", real)
    assert r.is_finished and "injected fault" in (r.error or "")
    assert engine.runner.free_pages == free
    ok = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, ignore_eos=True))[0]
    assert len(ok.output_ids) == 2


def test_bad_model_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("REDKNOT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_model(str(junk))
    trunc = tmp_path / "trunc.gguf"
    with open(default_model_path(), "rb") as f:
        trunc.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError):
        load_model(str(trunc))
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(empty_dir))
    assert not (tmp_path / "cache" / "models").exists() or not any(
        (p / "config.json").exists() for p in (tmp_path / "cache" / "models").iterdir()
    )
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_short_prompt_is_not_stuck_behind_a_long_prefill(engine):
    """Prefill chunks go shortest-remaining first: a short request submitted while a long prompt is being
    prefilled in chunks gets its first token before the long prompt finishes its prefill."""
    budget = engine.config.max_prefill_tokens
    long_req = engine.submit(engine.make_request([5] * (3 * budget), SamplingParams(max_new_tokens=1)))
    engine.step()  # the long prompt's first chunk
    assert not long_req.is_prefill_done
    short = engine.submit(engine.make_request([1, 2, 3], SamplingParams(max_new_tokens=1)))
    engine.step()
    assert short.output_ids and not long_req.is_prefill_done
    while not long_req.is_finished:
        engine.step()
    assert long_req.output_ids
