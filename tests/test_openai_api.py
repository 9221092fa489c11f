"""OpenAI API conformance (issue 28), driven by the `openai` package over the app in process: model
retrieval, the standard fields `metadata` and `store`, invalid values answered 400 as OpenAI does
(temperature in 0-2), and logprobs in streamed chat and completions."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
KEY = "oai-key"


@pytest.fixture(scope="module")
def oai(engine):
    from fastapi.testclient import TestClient

    from redknot_rag.server.app import create_app
    from redknot_rag.server.runtime import Runtime
    from redknot_rag.server.settings import ServerSettings

    rt = Runtime(engine, ServerSettings(api_key=KEY, max_new_tokens_limit=64, log_requests=False))
    with TestClient(create_app(rt), raise_server_exceptions=False) as client:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


def _msgs(text: str = "What is 2+2?") -> list[dict]:
    return [{"role": "user", "content": text}]


def test_retrieve_the_served_model_and_404_for_another(oai):
    name = oai.models.list().data[0].id
    m = oai.models.retrieve(name)
    assert m.id == name and m.object == "model"
    with pytest.raises(openai.NotFoundError, match="not found"):
        oai.models.retrieve("gpt-4o")


def test_metadata_and_store_are_accepted(oai):
    name = oai.models.list().data[0].id
    c = oai.chat.completions.create(
        model=name, messages=_msgs(), max_tokens=2, temperature=0, metadata={"team": "docs"}, store=False
    )
    assert c.usage.completion_tokens == 2
    c = oai.completions.create(
        model=name, prompt="Hi", max_tokens=2, extra_body={"metadata": {"a": "b"}, "store": True}
    )
    assert c.usage.completion_tokens == 2


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"extra_body": {"bogus": 1}}, "bogus: unknown field"),
    ],
)
def test_invalid_values_answer_400_like_openai(oai, kw, needle):
    name = oai.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match=needle) as e:
        oai.chat.completions.create(model=name, messages=_msgs(), **{"max_tokens": 2, **kw})
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai.chat.completions.create(model=name, messages=[], max_tokens=2)


def test_streamed_chat_carries_the_logprobs_of_every_token(oai):
    name = oai.models.list().data[0].id
    kw = {"model": name, "messages": _msgs(), "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = oai.chat.completions.create(**kw)
    streamed = [
        item
        for ch in oai.chat.completions.create(**kw, stream=True)
        if ch.choices and ch.choices[0].logprobs
        for item in ch.choices[0].logprobs.content
    ]
    want = whole.choices[0].logprobs.content
    stopped = whole.choices[0].finish_reason == "stop"
    assert len(want) == whole.usage.completion_tokens - stopped and len(streamed) == len(want)
    assert [t.token for t in streamed] == [t.token for t in want]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in want], abs=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in streamed)


def test_streamed_completion_carries_logprobs_and_offsets(oai):
    name = oai.models.list().data[0].id
    kw = {"model": name, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    whole = oai.completions.create(**kw).choices[0].logprobs
    tokens, offsets, text = [], [], ""
    for ch in oai.completions.create(**kw, stream=True):
        if ch.choices:
            text += ch.choices[0].text
            if ch.choices[0].logprobs:
                tokens += ch.choices[0].logprobs.tokens
                offsets += ch.choices[0].logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
    assert text == "".join(tokens)


def test_logprobs_carry_the_real_bytes_of_tokens_that_split_a_character(oai):
    """`日本語`: byte-level BPE splits `日` over two tokens. Each token's `bytes` are its own (joined they are
    the text's UTF-8), and a token that is part of a character reads `bytes:\\xNN` as in OpenAI's API."""
    name = oai.models.list().data[0].id
    c = oai.chat.completions.create(
        model=name,
        messages=_msgs("Repeat exactly: 日本語"),
        max_tokens=12,
        temperature=0,
        logprobs=True,
        extra_body={"regex": "日本語"},
    )
    content = c.choices[0].logprobs.content
    assert c.choices[0].message.content == "日本語"
    assert bytes(b for t in content for b in t.bytes).decode("utf-8") == "日本語"
    assert any(t.token.startswith("bytes:\\x") for t in content)  # a partial character, never U+FFFD
    assert all("\ufffd" not in t.token for t in content)


def test_echo_with_logprobs_keeps_a_non_ascii_prompt_and_its_offsets(oai):
    name = oai.models.list().data[0].id
    prompt = "日本語のテキスト: "
    c = oai.completions.create(model=name, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
    ch, lp = c.choices[0], c.choices[0].logprobs
    assert ch.text.startswith(prompt)  # the echoed prompt intact (3 new tokens may end mid-character)
    n_prompt = c.usage.prompt_tokens
    assert lp.text_offset[n_prompt] == len(prompt)  # the first completion token starts where the prompt ends
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(ch.text)


def test_the_end_of_sequence_token_is_in_no_logprob(oai):
    """A choice that ended on the end-of-sequence token shows neither its text nor its logprob."""
    name = oai.models.list().data[0].id
    c = oai.chat.completions.create(
        model=name, messages=_msgs("Say yes."), max_tokens=8, temperature=0, logprobs=True, extra_body={"regex": "yes"}
    )
    assert c.choices[0].finish_reason == "stop" and c.choices[0].message.content == "yes"
    assert "".join(t.token for t in c.choices[0].logprobs.content) == "yes"
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens - 1
