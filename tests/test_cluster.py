"""`redknot cluster up` on loopback: a real redis-server, 2 `redknot serve` replicas sharing it, and SGLang's
router (sglang-router from PyPI, cache-aware policy) in front. /generate is answered through the router; a
chunk ingested through one replica is found in Redis by the other (no prefill there); that replica is killed
mid-run while requests flow (no failure beyond those in flight), and a prompt with the chunk, sent through
the router, is answered by the survivor with the chunk's KV reused (`cached_tokens` > 0).

Replicas serve the shipped `tiny-gqa` model (random weights; `redknot_rag/tiny.py`) so that two of them
start in seconds on a 2-core box. Missing redis-server or sglang-router skip the test, except under
`REDKNOT_REQUIRE_REDIS` (CI), where they fail it.
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from redknot_rag.ports import free_ports

pytestmark = pytest.mark.timeout(300)

SERVE = ("--model-path", "tiny-gqa", "--device", "cpu", "--dtype", "float32", "--cpu-kv-gib", "0.05")
DOC = "Alice keeps the spare key of the lab under the blue flowerpot near the door. The lab opens at nine."
PROMPTS = [f"Request number {i}: tell me about topic {i * 7}." for i in range(8)]


def _require() -> None:
    missing = []
    if shutil.which("redis-server") is None:
        missing.append("redis-server (apt-get install redis-server)")
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        missing.append("sglang-router (pip install sglang-router)")
    if missing:
        why = "needs " + " and ".join(missing)
        if os.environ.get("REDKNOT_REQUIRE_REDIS"):
            pytest.fail(why)
        pytest.skip(why)


def _generate(url: str, text: str) -> Any:
    import httpx

    body = {"text": text, "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    return httpx.post(url + "/generate", json=body, timeout=60)


def _served(url: str) -> int:
    """Requests a replica has answered (its Prometheus counter of finished requests)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("redknot_request_success_total")
        )
    )


def test_two_replicas_behind_the_router(tmp_path: Path) -> None:
    _require()
    import httpx

    from redknot_rag.cluster import Cluster, ClusterSpec
    from redknot_rag.loader import load_model
    from redknot_rag.rag.layout import PromptLayout

    router, replica, redis = free_ports(3)
    # replica ports are replica_port + i: take two free ports in a row from a base the OS just handed out
    spec = ClusterSpec(
        replicas=2,
        port=router,
        replica_port=replica,
        redis_port=redis,
        serve_args=(*SERVE, "--data-dir", str(tmp_path / "replica-{replica}")),  # own doc DB, shared Redis
        log_dir=tmp_path / "logs",
        start_timeout_s=240,
    )
    with Cluster(spec) as c:
        # the replicas share the redis-server the launcher started
        assert c.redis is not None and c.redis.poll() is None
        direct = {p: _generate(spec.replica_url(0), p).json()["output_ids"] for p in PROMPTS[:2]}
        answers = []
        for p in PROMPTS:
            r = _generate(spec.router_url, p)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        assert all(len(a["output_ids"]) == 6 for a in answers)
        for p, a in zip(PROMPTS, answers):  # greedy: the same tokens whichever replica answered
            if p in direct:
                assert a["output_ids"] == direct[p]
        served = [_served(spec.replica_url(i)) for i in range(2)]
        print("requests answered per replica:", served)
        assert sum(served) == len(PROMPTS) + len(direct)

        # the replica that answered most ingests a document: its chunk KV is prefilled and written to Redis;
        # the other ingests the same document and finds the chunk there (no prefill: kv_bytes 0)
        victim = served.index(max(served))
        survivor = 1 - victim
        doc = {"documents": [{"doc_id": "keys", "text": DOC}]}
        first = httpx.post(spec.replica_url(victim) + "/ingest", json=doc, timeout=120).json()["documents"]
        second = httpx.post(spec.replica_url(survivor) + "/ingest", json=doc, timeout=120).json()["documents"]
        assert first["kv_chunks"] == 1 and first["kv_bytes"] > 0
        assert second["kv_chunks"] == 1 and second["kv_bytes"] == 0

        # failure drill: kill that replica while requests keep coming (2 at a time); only requests in
        # flight at the kill may fail, and the router serves everything after it from the other
        results: list[int] = []
        in_flight_at_kill = 0
        lock = threading.Lock()
        started = threading.Semaphore(0)

        begun = [0]

        def one(i: int) -> None:
            with lock:
                begun[0] += 1
            started.release()
            code = _generate(spec.router_url, f"{PROMPTS[i % len(PROMPTS)]} again {i}").status_code
            with lock:
                results.append(code)

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(one, i) for i in range(16)]
            for _ in range(4):
                started.acquire()
            with lock:  # an upper bound: some of these may be on the other replica
                in_flight_at_kill = begun[0] - len(results)
                c.stop_replica(victim)
            for f in futures:
                f.result()
        failed = sum(code != 200 for code in results)
        print(f"killed replica {victim}: {failed} failed of {len(results)}, {in_flight_at_kill} in flight at the kill")
        assert len(results) == 16
        assert failed <= in_flight_at_kill
        assert c.replicas[survivor].poll() is None

        # a prompt carrying the chunk, through the router: the survivor answers and reuses the chunk's KV,
        # which only the killed replica ever computed (it came from Redis)
        layout = PromptLayout.for_tokenizer(load_model("tiny-gqa").tokenizer)
        got = httpx.post(spec.replica_url(survivor) + "/retrieve", json={"question": "spare key"}, timeout=60).json()
        text = layout.format.prefix + got["context"] + "Question: Where is the spare key?" + layout.format.suffix
        ids = layout.tokenizer.encode(text, add_special_tokens=False)
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        r = httpx.post(spec.router_url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        cached = r.json()["meta_info"]["cached_tokens"]  # reused chunk tokens (the anchor is not counted)
        print(f"cached_tokens {cached} of the chunk's {len(layout.chunk_ids(DOC))} tokens")
        assert cached > 0
