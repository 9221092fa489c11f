"""Request bodies of every route, as strict pydantic models (unknown fields are errors).

Field names follow SGLang (native API), OpenAI (the /v1 API) and the project's own /query.
Validation that needs the engine (token counts, vocabulary) happens later, in `generation.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- SGLang native --------------------------------------------------------------------------
class SglSamplingParams(_Strict):
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None
    sampling_seed: int | None = None
    seed: int | None = None


class GenerateRequest(_Strict):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SglSamplingParams | list[SglSamplingParams] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool | None = None
    stream: bool | None = None
    rid: str | list[str] | None = None
    image_data: Any = None
    modalities: Any = None
    lora_path: Any = None


class AbortRequest(_Strict):
    rid: str


# ---- OpenAI ----------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _OpenAISampling(_Strict):
    """OpenAI fields (some accepted and ignored: `user`, `logit_bias`) + SGLang's `extra_body` ones."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # SGLang extensions, accepted through `extra_body`
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


# ---- RAG -------------------------------------------------------------------------------------
class QueryRequest(_Strict):
    question: str = Field(min_length=1)
    top_k: int = Field(default=6, ge=1, le=64)
    namespace: str = "default"
    reuse_policy: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    stream: bool = False


class RetrieveRequest(_Strict):
    question: str = Field(min_length=1)
    top_k: int = Field(default=6, ge=1, le=64)
    namespace: str = "default"


class IngestDocument(_Strict):
    doc_id: str = Field(min_length=1)
    text: str
    metadata: dict[str, Any] | None = None


class IngestRequest(_Strict):
    namespace: str = "default"
    documents: list[IngestDocument] | None = None
    paths: list[str] | None = None
