"""Request bodies of every route, as strict pydantic models (unknown fields are errors, NaN and
infinities are refused). The served OpenAPI spec declares them (app.py), so clients and fuzzers
see the same ranges the server enforces.

Field names follow SGLang (native API), OpenAI (the /v1 API) and the project's own /query.
Validation that needs the engine or the settings (token counts, vocabulary, `max_new_tokens_limit`)
happens later, in runtime.py; `SamplingParams.validate` repeats the ranges for callers without HTTP.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from redknot_rag.limits import MAX_DOCUMENTS_PER_INGEST, MAX_PATHS_PER_INGEST, MAX_RID_CHARS, require_visible
from redknot_rag.rag.answer_defaults import QUERY_DEFAULTS
from redknot_rag.retrieval.docdb import DOC_ID_PATTERN, NAMESPACE_PATTERN, validate_doc_id
from redknot_rag.reuse import make_policy
from redknot_rag.sampling import SEED_MAX


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _policy(name: str) -> str:
    make_policy(name)  # ValueError → 422 naming the known policies
    return name


NonNegInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX - 16)]
Temperature = Annotated[float, Field(ge=0)]
OpenAITemperature = Annotated[float, Field(ge=0, le=2)]  # OpenAI's range (SGLang's native API takes more)
MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]
TopP = Annotated[float, Field(gt=0, le=1)]
MinP = Annotated[float, Field(ge=0, le=1)]
TopK = Annotated[int, Field(ge=-1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=2)]
NumSamples = Annotated[int, Field(ge=1, le=16)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
Rid = Annotated[str, Field(min_length=1, max_length=MAX_RID_CHARS)]
Namespace = Annotated[str, Field(pattern=NAMESPACE_PATTERN)]
# the length limits of questions and documents are the server's settings, checked by the routes (413)
Question = Annotated[str, Field(min_length=1), AfterValidator(require_visible)]
PolicyName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_policy)]
DocId = Annotated[str, Field(pattern=DOC_ID_PATTERN), AfterValidator(validate_doc_id)]


# ---- SGLang native --------------------------------------------------------------------------
class SglSamplingParams(_Strict):
    max_new_tokens: NonNegInt | None = None
    min_new_tokens: NonNegInt | None = None
    n: NumSamples | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    stop_regex: str | list[str] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None
    sampling_seed: Seed | None = None
    seed: Seed | None = None


class GenerateRequest(_Strict):
    text: str | list[str] | None = None
    input_ids: list[NonNegInt] | list[list[NonNegInt]] | None = None
    sampling_params: SglSamplingParams | list[SglSamplingParams] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: TopLogprobs | list[TopLogprobs] | None = None
    return_text_in_logprobs: bool | None = None
    stream: bool | None = None
    rid: Rid | list[Rid] | None = None
    image_data: Any = None
    modalities: Any = None
    lora_path: Any = None
    # sent by SGLang's router (sglang-router) with every request it forwards: accepted; the ones asking for
    # output this server does not produce (hidden states, entropy, bytes, background runs) must be false
    model: str | None = None
    log_metrics: bool | None = None
    no_logs: bool | None = None
    return_hidden_states: Literal[False] | None = None
    return_entropy: Literal[False] | None = None
    return_bytes: Literal[False] | None = None
    background: Literal[False] | None = None


class AbortRequest(_Strict):
    rid: Rid


# ---- OpenAI ----------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _OpenAISampling(_Strict):
    """OpenAI fields (some accepted and ignored: `user`, `metadata`, `store`: nothing is stored) + SGLang's
    `extra_body` ones."""

    model: str | None = None
    max_tokens: NonNegInt | None = None
    temperature: OpenAITemperature | None = None
    top_p: TopP | None = None
    n: NumSamples | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None  # OpenAI's limits
    store: bool | None = None
    # SGLang extensions, accepted through `extra_body`
    top_k: TopK | None = None
    min_p: MinP | None = None
    min_tokens: NonNegInt | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[NonNegInt] | list[list[NonNegInt]]
    echo: bool | None = None
    logprobs: TopLogprobs | None = None
    best_of: NumSamples | None = None
    suffix: str | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool results


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


# ---- RAG -------------------------------------------------------------------------------------
class QueryRequest(_Strict):
    question: Question
    top_k: int = Field(default=6, ge=1, le=64)
    namespace: Namespace = "default"
    reuse_policy: PolicyName | None = None
    # defaults: rag.answer_defaults.QUERY_DEFAULTS (None: its stop strings / repetition penalty)
    max_new_tokens: NonNegInt = QUERY_DEFAULTS.max_new_tokens
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    stop: list[str] | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stream: bool = False


class RetrieveRequest(_Strict):
    question: Question
    top_k: int = Field(default=6, ge=1, le=64)
    namespace: Namespace = "default"


class IngestDocument(_Strict):
    """Either `text`, or a PDF/DOCX file's bytes as `content_base64` with its `format` (the server
    extracts the text as it does for a file on disk; the size limit applies to the decoded file)."""

    doc_id: DocId
    text: Annotated[str, Field(min_length=1), AfterValidator(require_visible)] | None = None
    content_base64: str | None = Field(default=None, min_length=1)
    format: Literal["pdf", "docx"] | None = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> IngestDocument:
        if (self.text is None) == (self.content_base64 is None):
            raise ValueError(f"document {self.doc_id!r}: give exactly one of text, content_base64")
        if (self.content_base64 is None) != (self.format is None):
            raise ValueError(f"document {self.doc_id!r}: format ('pdf' or 'docx') goes with content_base64")
        return self


class IngestRequest(_Strict):
    """`documents` (text sent in the body) and/or `paths` (files on the server, for operators)."""

    namespace: Namespace = "default"
    documents: list[IngestDocument] | None = Field(default=None, max_length=MAX_DOCUMENTS_PER_INGEST)
    paths: list[Annotated[str, Field(min_length=1, max_length=4096, pattern=r"\S")]] | None = Field(
        default=None, max_length=MAX_PATHS_PER_INGEST
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> IngestRequest:
        seen: set[str] = set()
        for d in self.documents or []:
            if d.doc_id in seen:
                raise ValueError(f"duplicate doc_id {d.doc_id!r} in one request")
            seen.add(d.doc_id)
        return self
