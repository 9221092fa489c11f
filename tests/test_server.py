"""`redknot serve` end to end: the real server in a subprocess on 127.0.0.1, driven by real clients
(SGLang's frontend through `sgl.RuntimeEndpoint`, the `openai` package, httpx for raw HTTP).

Two servers: a main one (keys, limits) and a small one (queue of 1) for 429s and graceful shutdown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from redknot_rag.ports import free_port

KEY, ADMIN = "test-key", "admin-key"
MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the served name of the embedded default model
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
HAS_RAG = importlib.util.find_spec("redknot_rag.rag") is not None
needs_rag = pytest.mark.skipif(not HAS_RAG, reason="redknot_rag.rag (RagService) is not in this tree yet")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def start_server(tmp: Path, *extra: str, data_dir: Path | None = None) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "redknot_rag.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--admin-key",
        ADMIN,
        "--device",
        "cpu",
        "--cpu-kv-gib",
        "0.25",
        *extra,
    ]
    cmd += ["--data-dir", str(data_dir if data_dir is not None else tmp / "data")]  # never the user's folder
    log_path = tmp / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{srv.log()}")
        try:
            if httpx.get(srv.url + "/health", timeout=1).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server did not come up:\n{srv.log()}")


def stop_server(srv: Server) -> None:
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(
        tmp,
        "--max-new-tokens-limit",
        "256",
        "--max-request-bytes",
        "200000",
        data_dir=tmp / "data" if HAS_RAG else None,
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def gen(client: httpx.Client, text: str = "The capital of France is", **sp) -> dict:
    sp.setdefault("max_new_tokens", 6)
    sp.setdefault("temperature", 0)
    r = client.post("/generate", json={"text": text, "sampling_params": sp})
    assert r.status_code == 200, r.text
    return r.json()


def assert_serving(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    assert gen(client, max_new_tokens=2)["meta_info"]["completion_tokens"] == 2


def sse_events(lines: Iterator[str]) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ---- SGLang native API ----------------------------------------------------------------------
def test_model_and_server_info(client):
    info = client.get("/get_model_info").json()
    assert Path(info["model_path"], "config.json").is_file() and "SmolLM2" in info["served_model_name"]
    for path in ("/server_info", "/get_server_info"):
        si = client.get(path).json()
        assert si["engine"]["kv_heads"] >= 1 and si["max_new_tokens_limit"] == 256
    assert client.post("/flush_cache").status_code == 403  # admin-only
    assert client.post("/flush_cache", headers=ADMIN_AUTH).status_code == 200
    assert client.get("/health_generate").json() == {"status": "ok"}
    assert httpx.get(client.base_url.join("/health")).status_code == 200  # no key needed


def test_generate_single_batch_input_ids(client):
    one = gen(client)
    meta = one["meta_info"]
    assert one["text"] and meta["completion_tokens"] == 6 and meta["prompt_tokens"] == 5
    assert meta["finish_reason"] == {"type": "length", "length": 6} and meta["cached_tokens"] == 0
    batch = client.post(
        "/generate",
        json={
            "text": ["The capital of France is", "1, 2, 3,"],
            "sampling_params": {"max_new_tokens": 6, "temperature": 0},
        },
    ).json()
    assert isinstance(batch, list) and batch[0]["text"] == one["text"]
    lp = client.post(
        "/generate",
        json={
            "text": "The capital of France is",
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
        },
    ).json()
    prompt_ids = [x[1] for x in lp["meta_info"]["input_token_logprobs"]]
    ids = client.post(
        "/generate",
        json={"input_ids": [prompt_ids, prompt_ids], "sampling_params": {"max_new_tokens": 6, "temperature": 0}},
    ).json()
    assert [x["text"] for x in ids] == [one["text"]] * 2  # the same 5 prompt tokens as text
    flat = client.post(
        "/generate", json={"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    ).json()
    assert flat["text"] == one["text"]


def test_generate_sampling_fields(client):
    params = {
        "max_new_tokens": 8,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.01,
        "n": 3,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.1,
        "sampling_seed": 7,
        "ignore_eos": True,
    }
    special = {"skip_special_tokens": True, "spaces_between_special_tokens": True}
    r = client.post("/generate", json={"text": "Once upon a time", "sampling_params": {**params, **special}}).json()
    assert len(r) == 3 and all(x["meta_info"]["completion_tokens"] == 8 for x in r)
    again = client.post("/generate", json={"text": "Once upon a time", "sampling_params": params}).json()
    assert [x["text"] for x in again] == [x["text"] for x in r]  # seeded
    full = gen(client, "1, 2, 3, 4,", max_new_tokens=12)["text"]
    stop = full.strip().split(" ")[1]
    cut = gen(client, "1, 2, 3, 4,", max_new_tokens=12, stop=[stop])
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop} and stop not in cut["text"]
    first_id = gen(client, "1, 2, 3, 4,", max_new_tokens=12)["output_ids"][1]
    by_id = gen(client, "1, 2, 3, 4,", max_new_tokens=12, stop_token_ids=[first_id])
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": first_id}
    assert gen(client, "Hi", max_new_tokens=10, min_new_tokens=10)["meta_info"]["completion_tokens"] == 10
    rx = gen(client, "1, 2, 3, 4,", max_new_tokens=12, stop_regex=r"\d, \d")
    assert rx["meta_info"]["finish_reason"]["type"] == "stop"


def test_generate_logprobs_and_prefill_only(client):
    pre = gen(client, "The capital of France is", max_new_tokens=0)
    assert pre["text"] == "" and pre["meta_info"]["prompt_tokens"] == 5
    r = client.post(
        "/generate",
        json={
            "text": "The capital of France is",
            "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    ).json()
    m = r["meta_info"]
    inp, out = m["input_token_logprobs"], m["output_token_logprobs"]
    assert len(inp) == 5 and len(out) == 3
    assert all(isinstance(x[0], float) and isinstance(x[1], int) and isinstance(x[2], str) for x in inp + out)
    assert [x[1] for x in out] == r["output_ids"]
    assert len(m["output_top_logprobs"]) == 3 and len(m["output_top_logprobs"][0]) == 2
    assert m["output_top_logprobs"][0][0][1] == out[0][1]  # greedy = the top-1
    no_text = client.post(
        "/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 1}, "return_logprob": True}
    ).json()
    assert no_text["meta_info"]["output_token_logprobs"][0][2] is None


def test_generate_stream(client):
    body = {
        "text": "The capital of France is",
        "stream": True,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0},
    }
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and len(events) >= 3
    texts = [e["text"] for e in events[:-1]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"
    assert texts[-1] == gen(client, max_new_tokens=8)["text"]


def test_constrained_regex_and_json_schema(client):
    r = gen(client, "My phone number is", max_new_tokens=24, regex=r"\(\d{3}\) \d{3}-\d{4}")
    import re

    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r["text"]), r["text"]
    assert r["meta_info"]["finish_reason"]["type"] == "stop"
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer"},
            "pet": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "age", "pet"],
    }
    j = gen(client, "A JSON record about Alice:", max_new_tokens=48, json_schema=json.dumps(schema))
    obj = json.loads(j["text"])
    assert set(obj) == {"name", "age", "pet"} and isinstance(obj["age"], int) and obj["pet"] in ("cat", "dog")
    e = gen(client, "Is the sky blue?", max_new_tokens=8, ebnf='root ::= "yes" | "no"')
    assert e["text"] in ("yes", "no") and e["meta_info"]["finish_reason"]["type"] == "stop"


def test_concurrent_requests_and_a_failing_one(client):
    def one(i: int) -> int:
        if i == 5:
            return client.post("/generate", json={"text": "x", "sampling_params": {"regex": "(unclosed"}}).status_code
        return client.post(
            "/generate", json={"text": f"Count to {i}:", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        ).status_code

    with ThreadPoolExecutor(12) as ex:
        codes = list(ex.map(one, range(12)))
    assert codes.count(200) == 11 and codes[5] == 400


# ---- SGLang frontend programs ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sgl_backend(server):
    import sglang as sgl

    sgl.global_config.enable_parallel_encoding = False
    backend = sgl.RuntimeEndpoint(server.url, api_key=KEY, chat_template_name="chatml")
    sgl.set_default_backend(backend)
    return backend


def test_sgl_gen_select_regex_fork(sgl_backend):
    import sglang as sgl

    @sgl.function
    def program(s, question):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0))
        s += sgl.user("Is that correct? Answer yes or no.")
        s += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))
        s += sgl.user("How many legs does a spider have?")
        s += sgl.assistant(sgl.gen("legs", max_tokens=6, dtype=int, temperature=0))
        s += sgl.user("Give a 3-digit code.")
        s += sgl.assistant(sgl.gen("code", max_tokens=8, regex=r"[0-9]{3}", temperature=0))
        s += sgl.user("Describe the city as JSON.")
        s += sgl.assistant(
            sgl.gen(
                "city",
                max_tokens=40,
                temperature=0,
                json_schema=json.dumps(
                    {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 12}, "big": {"type": "boolean"}},
                        "required": ["city", "big"],
                    }
                ),
            )
        )

    st = program.run(question="What is the capital of France?")
    city = json.loads(st["city"])
    assert set(city) == {"city", "big"} and isinstance(city["big"], bool)
    assert st["answer"] and st["verdict"] in ("yes", "no")
    assert st["legs"].strip().lstrip("+-").isdigit()
    assert len(st["code"]) == 3 and st["code"].isdigit()
    meta = st.get_meta_info("answer")
    assert meta["completion_tokens"] >= 1 and "prompt_tokens" in meta

    @sgl.function
    def forked(s):
        s += sgl.user("Name a fruit.")
        forks = s.fork(2)
        for f in forks:
            f += sgl.assistant(sgl.gen("fruit", max_tokens=5, temperature=0))
        forks.join()
        s += sgl.assistant("ok")

    st = forked.run()
    assert st.text().endswith("ok<|im_end|>\n")


def test_sgl_stream_and_run_batch(sgl_backend):
    import sglang as sgl

    @sgl.function
    def qa(s, q):
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen("a", max_tokens=8, temperature=0))

    st = qa.run(q="Say hello.", stream=True)
    pieces = list(st.text_iter("a"))
    assert len(pieces) >= 2
    assert "".join(pieces) == qa.run(q="Say hello.")["a"]
    states = qa.run_batch([{"q": "1+1?"}, {"q": "Capital of Italy?"}, {"q": "Color of the sky?"}], num_threads=3)
    assert len(states) == 3 and all(s["a"] for s in states)
    info = sgl_backend.get_server_info()  # a user key: no path on the server's disk (issue 28)
    assert info["served_model_name"] and "model_path" not in info
    with pytest.raises(RuntimeError, match="admin key"):
        sgl.flush_cache()  # admin-only: a user key may not empty the shared cache
    sgl.flush_cache(sgl.RuntimeEndpoint(sgl_backend.base_url, api_key=ADMIN))


def test_sgl_tool_use_program(sgl_backend):
    """SGLang's own `tool_use` program (sglang/test/test_programs.py): gen with stop=")" feeds a tool."""
    import sglang as sgl

    def calculate(expression):
        return f"{eval(expression, {'__builtins__': {}})}"

    @sgl.function
    def tool_use(s, lhs, rhs):
        s += "Please perform computations using a calculator. You can use calculate(expression) to get the results.\n"
        s += "For example,\ncalculate(1+2)=3\ncalculate(3*4)=12\n"
        s += "Question: What is the product of " + str(lhs) + " and " + str(rhs) + "?\n"
        s += "Answer: The answer is calculate(" + sgl.gen("expression", stop=")") + ") = "
        with s.var_scope("answer"):
            s += calculate(s["expression"])

    ret = tool_use(lhs=257, rhs=983, temperature=0)
    assert ")" not in ret["expression"] and int(ret["answer"]) == 257 * 983, ret.text()


def test_sglang_frontend_programs_stream_logprobs_and_min_new_tokens(sgl_backend, monkeypatch):
    """SGLang's own frontend test programs that need the server's side: per-chunk streamed logprobs,
    and `min_tokens` checked with the tokenizer loaded from `/get_model_info`'s `model_path`."""
    import types

    from sglang.test import test_programs
    from transformers import AutoTokenizer

    test_programs.test_stream_logprobs()
    # `get_tokenizer` lives in sglang.srt, which needs the full SGLang runtime (torchvision, ...); for a
    # local directory it is AutoTokenizer.from_pretrained, which is what matters here: model_path loads.
    utils = types.ModuleType("sglang.srt.utils.hf_transformers_utils")
    utils.get_tokenizer = AutoTokenizer.from_pretrained  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sglang.srt.utils.hf_transformers_utils", utils)
    monkeypatch.setattr(sgl_backend, "endpoint", sgl_backend, raising=False)  # the program expects sgl.Runtime
    test_programs.test_gen_min_new_tokens()


# ---- OpenAI API -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_models_and_completions(oai):
    models = oai.models.list()
    name = models.data[0].id
    c = oai.completions.create(model=name, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    assert c.choices[0].text and c.usage.completion_tokens == 6 and c.usage.prompt_tokens == 5
    assert len(c.choices[0].logprobs.tokens) == 6
    many = oai.completions.create(model=name, prompt=["a b c", "1 2 3"], max_tokens=3, temperature=0, n=2)
    assert len(many.choices) == 4
    stream = oai.completions.create(
        model=name, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == c.choices[0].text
    yn = oai.completions.create(
        model=MODEL,
        prompt="Is the sky blue?",
        max_tokens=4,
        temperature=0,
        extra_body={"ebnf": 'root ::= "yes" | "no"'},
    )
    assert yn.choices[0].text in ("yes", "no") and yn.choices[0].finish_reason == "stop"


def test_openai_echo_logprobs_offsets_and_model_name(oai):
    import openai

    name = oai.models.list().data[0].id
    prompt = "The capital of France is"
    c = oai.completions.create(model=name, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
    ch, lp = c.choices[0], c.choices[0].logprobs
    n_prompt = c.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and ch.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(lp.tokens))]
    assert "".join(lp.tokens) == ch.text  # offsets index the echoed prompt + completion
    assert lp.text_offset[n_prompt] == len(prompt)
    plain = oai.completions.create(model=name, prompt=prompt, max_tokens=3, temperature=0, logprobs=1)
    assert ch.text == prompt + plain.choices[0].text  # echo adds the prompt, changes nothing else
    with pytest.raises(openai.NotFoundError, match="not found"):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1)


def test_openai_chat(oai):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    c = oai.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    text = c.choices[0].message.content
    assert text and c.choices[0].finish_reason in ("stop", "length")
    stopped = c.choices[0].finish_reason == "stop"  # the end-of-sequence token is in no text and no logprob
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens - stopped
    assert c.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(
        oai.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == c.usage.completion_tokens
    js = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "cat",
                "schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 16}, "lives": {"type": "integer"}},
                    "required": ["name", "lives"],
                },
            },
        },
    )
    assert set(json.loads(js.choices[0].message.content)) == {"name", "lives"}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}


def test_openai_tools(oai):
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    c = oai.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER_TOOL], tool_choice=named, max_tokens=30, temperature=0
    )
    ch = c.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city"}
    r = oai.chat.completions.create(
        model=MODEL,
        messages=ask,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=40,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    stream = oai.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER_TOOL], tool_choice=named, max_tokens=30, temperature=0, stream=True
    )
    chunks = [ch for ch in stream if ch.choices]
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)
    streamed = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in streamed] == [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # auto: the listing is in the prompt; whatever the model wrote is either parsed calls or content
    a = oai.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER_TOOL], max_tokens=40, temperature=0)
    m = a.choices[0].message
    assert (a.choices[0].finish_reason == "tool_calls") == bool(m.tool_calls)
    assert m.tool_calls or m.content
    # a tool result in the history is rendered and answered
    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "4 degrees and rain"},
    ]
    f = oai.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=12, temperature=0
    )
    assert f.choices[0].message.content and not f.choices[0].message.tool_calls


# ---- bad input ----------------------------------------------------------------------------------
BAD = [
    ("malformed json", "POST", "/generate", b'{"text": "hi",', None, 400, "malformed JSON"),
    ("not an object", "POST", "/generate", b"[1, 2]", None, 422, "JSON object"),
    ("unknown field", "POST", "/generate", {"text": "hi", "bogus": 1}, None, 422, "bogus: unknown field"),
    (
        "unknown sampling field",
        "POST",
        "/generate",
        {"text": "hi", "sampling_params": {"max_tokenz": 3}},
        None,
        422,
        "max_tokenz: unknown field",
    ),
    (
        "wrong type",
        "POST",
        "/generate",
        {"text": "hi", "sampling_params": {"max_new_tokens": "5"}},
        None,
        422,
        "max_new_tokens",
    ),
    ("text and ids", "POST", "/generate", {"text": "hi", "input_ids": [1]}, None, 400, "exactly one"),
    (
        "negative max_new_tokens",
        "POST",
        "/generate",
        {"text": "hi", "sampling_params": {"max_new_tokens": -1}},
        None,
        422,
        "max_new_tokens",
    ),
    (
        "huge max_new_tokens",
        "POST",
        "/generate",
        {"text": "hi", "sampling_params": {"max_new_tokens": 10**9}},
        None,
        400,
        "exceeds this server's limit",
    ),
    (
        "bad temperature",
        "POST",
        "/generate",
        {"text": "hi", "sampling_params": {"temperature": -1.0}},
        None,
        422,
        "temperature",
    ),
    (
        "invalid regex",
        "POST",
        "/generate",
        {"text": "hi", "sampling_params": {"regex": "[a-"}},
        None,
        400,
        "invalid regex",
    ),
    (
        "bad json_schema",
        "POST",
        "/generate",
        {"text": "hi", "sampling_params": {"json_schema": "{nope"}},
        None,
        400,
        "json_schema",
    ),
    ("token id out of vocab", "POST", "/generate", {"input_ids": [10**7]}, None, 400, "token ids"),
    ("prompt too long", "POST", "/generate", {"input_ids": [42] * 9000}, None, 413, "context"),
    ("body too large", "POST", "/generate", {"text": "x" * 300000}, None, 413, "exceeds the limit"),
    ("missing key", "POST", "/generate", {"text": "hi"}, {}, 401, "missing API key"),
    ("wrong key", "POST", "/generate", {"text": "hi"}, {"Authorization": "Bearer nope"}, 401, "invalid API key"),
    (
        "user key on admin route",
        "POST",
        "/ingest",
        {"documents": [{"doc_id": "d", "text": "t"}]},
        AUTH,
        403,
        "admin key",
    ),
    ("unknown route", "GET", "/nope", None, None, 404, "no route"),
    ("wrong method", "GET", "/generate", None, None, 405, "not allowed"),
    (
        "chat tools",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        None,
        400,
        "tools[0]",
    ),
    (
        "chat tool_choice",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
        None,
        400,
        "non-empty tools",
    ),
    (
        "chat bad role",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        None,
        400,
        "role",
    ),
    ("chat empty messages", "POST", "/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    (
        "completions negative max_tokens",
        "POST",
        "/v1/completions",
        {"prompt": "x", "max_tokens": -5},
        None,
        400,
        "max_tokens",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(client, case):
    _, method, path, body, headers, status, needle = case
    kw: dict = {"headers": headers if headers is not None else AUTH}
    if isinstance(body, bytes):
        kw["content"] = body
    elif body is not None:
        kw["json"] = body
    with httpx.Client(base_url=client.base_url, timeout=60) as raw:
        r = raw.request(method, path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower(), err
    assert err["code"] == status


def test_server_keeps_serving_after_bad_input(client):
    assert_serving(client)


def test_client_disconnect_mid_stream_aborts(server, client):
    before = client.get("/metrics", headers=ADMIN_AUTH).text
    aborted_before = _metric(before, 'redknot_request_success_total{finished_reason="abort"}')
    body = {
        "text": "Write a very long story about dragons.",
        "stream": True,
        "sampling_params": {"max_new_tokens": 250, "ignore_eos": True},
    }
    with (
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c,
        c.stream("POST", "/generate", json=body) as r,
    ):
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break  # leave mid-stream: the context manager closes the connection
    deadline = time.time() + 20
    while time.time() < deadline:
        info = client.get("/server_info").json()
        m = client.get("/metrics", headers=ADMIN_AUTH).text
        aborted = _metric(m, 'redknot_request_success_total{finished_reason="abort"}')
        if info["num_running"] == 0 and aborted > aborted_before:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the engine request was not aborted after the client left")
    assert_serving(client)


def test_client_leaving_a_non_streaming_request_aborts(server, client):
    body = {"text": "Write a long story.", "sampling_params": {"max_new_tokens": 250, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, headers=AUTH, timeout=1.5)
    deadline = time.time() + 20
    while client.get("/server_info").json()["num_running"] and time.time() < deadline:
        time.sleep(0.2)
    assert client.get("/server_info").json()["num_running"] == 0
    assert_serving(client)


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def _parsed_metrics(client) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(client.base_url.join("/metrics"), headers=ADMIN_AUTH).text  # the admin key reads it
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics(client):
    gen(client, max_new_tokens=4)
    assert client.get("/generate").status_code == 405
    assert client.get("/no/such/route").status_code == 404
    v = _parsed_metrics(client)
    for name in (
        "redknot_num_requests_waiting",
        "redknot_num_requests_running",
        "redknot_kv_cache_usage_perc",
        "redknot_cached_tokens_total",
        "redknot_time_to_first_token_seconds_count",
    ):
        assert (name, ()) in v, name
    assert v[("redknot_time_to_first_token_seconds_count", ())] >= 1
    assert v[("redknot_inter_token_latency_seconds_bucket", (("le", "+Inf"),))] >= 3
    assert v[("redknot_http_requests_total", (("code", "200"), ("route", "/generate")))] >= 1
    assert v[("redknot_http_requests_total", (("code", "405"), ("route", "/generate")))] >= 1
    assert v[("redknot_http_requests_total", (("code", "404"), ("route", "unknown")))] >= 1


# ---- RAG routes ---------------------------------------------------------------------------------
DOCS = [
    {
        "doc_id": "lighthouse",
        "text": "The Varnholt lighthouse was built in 1873 by the engineer Ida Brask. "
        "Its lamp is visible for 19 nautical miles and it is painted in red and white bands.",
    },
    {
        "doc_id": "glacier",
        "text": "The Skelmir glacier retreats about 31 meters per year. Researchers measure "
        "it every August from a station at its northern edge.",
    },
    {
        "doc_id": "bakery",
        "text": "Mora's bakery on Linden Street sells cardamom buns every Thursday. "
        "The oven was imported from Turin in 1998.",
    },
]


@pytest.fixture(scope="module")
def ingested(client):
    if not HAS_RAG:
        pytest.skip("redknot_rag.rag (RagService) is not in this tree yet")
    r = client.post("/ingest", json={"namespace": "test", "documents": DOCS}, headers=ADMIN_AUTH)
    assert r.status_code == 200, r.text
    return r.json()


@needs_rag
def test_rag_query_documents_delete(client, ingested):
    assert client.get("/documents", params={"namespace": "test"}).status_code == 403  # admin-only
    docs = client.get("/documents", params={"namespace": "test"}, headers=ADMIN_AUTH).json()["documents"]
    assert {d["doc_id"] for d in docs} >= {"lighthouse", "glacier", "bakery"}
    q = client.post(
        "/query",
        json={"question": "Who built the Varnholt lighthouse?", "namespace": "test", "top_k": 2, "max_new_tokens": 24},
    ).json()
    assert q["answer"] and q["sources"] and q["sources"][0]["doc_id"] == "lighthouse"
    assert {"doc_id", "chunk_id", "score", "text"} <= set(q["sources"][0])
    for key in ("retrieve_ms", "kv_load_ms", "recompute_ms", "question_prefill_ms", "decode_ms"):
        assert any(k.startswith(key.split("_ms")[0]) for k in q["timing"]), (key, q["timing"])
    assert q["usage"]["cached_tokens"] > 0
    with client.stream(
        "POST",
        "/query",
        json={
            "question": "When is the glacier measured?",
            "namespace": "test",
            "top_k": 2,
            "max_new_tokens": 16,
            "stream": True,
        },
    ) as r:
        events = sse_events(r.iter_lines())
    assert events[0]["type"] == "sources" and events[-2]["type"] == "done" and events[-1] == "[DONE]"
    assert "".join(e["text"] for e in events if isinstance(e, dict) and e["type"] == "token") == events[-2]["answer"]
    ret = client.post("/retrieve", json={"question": "cardamom buns", "namespace": "test", "top_k": 1}).json()
    assert ret["chunks"][0]["doc_id"] == "bakery" and ret["chunks"][0]["text"] in ret["context"]
    r = client.post("/query", json={"question": "x", "namespace": "no-such-namespace"})
    assert r.status_code == 404 and "namespace" in r.json()["error"]["message"]
    assert client.delete("/documents/bakery", params={"namespace": "test"}).status_code == 403
    assert client.delete("/documents/bakery", params={"namespace": "test"}, headers=ADMIN_AUTH).status_code == 200
    assert client.delete("/documents/bakery", params={"namespace": "test"}, headers=ADMIN_AUTH).status_code == 404


@needs_rag
def test_chat_prompt_with_three_stored_chunks_reuses_kv(client, oai, ingested):
    """Three stored chunks in a /v1/chat/completions prompt are reported cached, and the answer
    matches a full prefill of the same prompt (reuse fidelity: same greedy first tokens)."""
    r = client.post("/ingest", json={"namespace": "test", "documents": DOCS}, headers=ADMIN_AUTH)  # re-add deleted
    assert r.status_code == 200, r.text
    ret = client.post(
        "/retrieve", json={"question": "lighthouse glacier bakery", "namespace": "test", "top_k": 3}
    ).json()
    assert len(ret["chunks"]) == 3
    question = "Who built the Varnholt lighthouse?"
    msgs = [{"role": "system", "content": ret["system"]}, {"role": "user", "content": ret["context"] + question}]
    c = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    chunk_tokens = sum(gen(client, ch["text"], max_new_tokens=0)["meta_info"]["prompt_tokens"] for ch in ret["chunks"])
    # cached = stored tokens reused as-is: all but what the served default policy recomputes (its ratio,
    # recorded in the model's profile by the fidelity harness, plus up to 4 tokens per chunk)
    policy = client.get("/server_info", headers=ADMIN_AUTH).json()["reuse_policy"]
    fields = policy.split(":")
    ratio = float(fields[1]) if fields[0].startswith("redknot") and len(fields) > 1 else 0.1
    assert c.usage.prompt_tokens_details.cached_tokens >= 0.9 * (chunk_tokens * (1 - ratio) - 4 * len(ret["chunks"]))
    # the full policy: the same ChatML prompt through /generate with prompt logprobs (which disables reuse)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"
    full = client.post(
        "/generate",
        json={
            "text": text,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
        },
    ).json()
    assert full["meta_info"]["cached_tokens"] == 0
    assert full["meta_info"]["prompt_tokens"] == c.usage.prompt_tokens
    # For a single prompt only the first word is asserted (first-token agreement on this prompt): answer
    # agreement with full prefill is a statistical property of the default policy, measured with confidence
    # intervals over hundreds of cases by `redknot eval` (bench/reuse: agreement@32 ~0.63 on this model).
    assert c.choices[0].message.content.split()[:1] == full["text"].split()[:1]


# ---- overload and graceful shutdown (a second, small server) ---------------------------------
@needs_rag
def test_metrics_reuse_store_and_route_templates(client, ingested):
    """After RAG traffic: reuse per policy, store tiers, and templated routes (never `unknown`)."""
    r = client.post(
        "/query",
        json={"question": "Who built the Varnholt lighthouse?", "namespace": "test", "top_k": 2, "max_new_tokens": 4},
    )
    assert r.status_code == 200, r.text
    client.delete("/documents/no-such-doc", params={"namespace": "test"}, headers=ADMIN_AUTH)
    v = _parsed_metrics(client)
    policies = {dict(k[1])["policy"] for k in v if k[0] == "redknot_reuse_reused_tokens_total"}
    assert policies and sum(v[("redknot_reuse_reused_tokens_total", (("policy", p),))] for p in policies) > 0
    assert any(k[0] == "redknot_reuse_phase_seconds_count" and dict(k[1])["phase"] == "kv_load" for k in v)
    assert any(k[0] == "redknot_store_bytes" for k in v) and ("redknot_store_block_lookups_total", ()) in v
    routes = {dict(k[1])["route"] for k in v if k[0] == "redknot_http_requests_total"}
    assert {"/query", "/ingest", "/documents/{doc_id:path}", "/metrics"} <= routes, routes
    assert not any(r.startswith("/documents/") and "{" not in r for r in routes)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("small"),
        "--max-running-requests",
        "1",
        "--max-queued-requests",
        "1",
        "--graceful-timeout",
        "20",
    )
    yield srv
    stop_server(srv)


def test_queue_full_answers_429(small_server):
    body = {"text": "Tell me a story.", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}

    def one(_: int) -> httpx.Response:
        return httpx.post(small_server.url + "/generate", json=body, headers=AUTH, timeout=120)

    with ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(one, range(8)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and codes.count(200) >= 1 and codes.count(429) >= 1, codes
    r429 = next(r for r in rs if r.status_code == 429)
    assert "overloaded" in r429.json()["error"]["message"] and r429.headers["retry-after"] == "1"
    assert httpx.get(small_server.url + "/health").status_code == 200


def test_graceful_shutdown_finishes_in_flight_stream(small_server):
    events: list = []
    body = {"text": "Count slowly:", "stream": True, "sampling_params": {"max_new_tokens": 30, "ignore_eos": True}}
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", small_server.url + "/generate", json=body, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    events.append(line)

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(60)
    small_server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["meta_info"]["completion_tokens"] == 30
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly
    assert small_server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    log = small_server.log()
    assert '"shutting down' in log or "shutting down" in log


# ---- drain on SIGTERM (a third server: the signal ends it) ------------------------------------
def test_sigterm_drains_every_stream_with_an_answer_or_an_error(tmp_path):
    """Three streams in flight at SIGTERM with a 6 s graceful window: the short one finishes, the long
    ones end with an explicit 503 error event and [DONE]; /health and new requests answer 503 while
    draining; the log has a `request finished` line per request."""
    srv = start_server(tmp_path, "--max-running-requests", "4", "--graceful-timeout", "6")
    bodies = [
        {"text": "Count:", "rid": "short", "stream": True, "sampling_params": {"max_new_tokens": 12}},
        *(
            {
                "text": "Tell a long story:",
                "rid": f"long-{i}",
                "stream": True,
                "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True},
            }
            for i in range(2)
        ),
    ]
    events: dict[str, list] = {b["rid"]: [] for b in bodies}
    started = {b["rid"]: threading.Event() for b in bodies}

    def consume(body: dict) -> None:
        with httpx.stream("POST", srv.url + "/generate", json=body, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started[body["rid"]].set()
                    events[body["rid"]].append(line[6:])

    threads = [threading.Thread(target=consume, args=(b,)) for b in bodies]
    try:
        for t in threads:
            t.start()
        assert all(e.wait(120) for e in started.values())
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(srv.url + "/health", timeout=10)
        late = httpx.post(srv.url + "/generate", json={"text": "hi"}, headers=AUTH, timeout=10)
        for t in threads:
            t.join(60)
        assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        stop_server(srv)
    assert health.status_code == 503 and "draining" in health.json()["error"]["message"]
    assert late.status_code == 503
    short = events["short"]
    assert short[-1] == "[DONE]" and json.loads(short[-2])["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    for rid in ("long-0", "long-1"):
        ev = events[rid]
        assert ev[-1] == "[DONE]", ev[-3:]
        err = json.loads(ev[-2])["error"]
        assert err["code"] == 503 and "shutting down" in err["message"], err
    finished = [
        json.loads(x) for x in srv.log_path.read_text().splitlines() if x.startswith("{") and '"request finished"' in x
    ]
    by_rid = {x["rid"]: x for x in finished}
    assert set(by_rid) >= {"short", "long-0", "long-1"}
    assert "shutting down" in by_rid["long-0"]["error"] and "error" not in by_rid["short"]
