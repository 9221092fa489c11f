"""OpenAI `tools` / `tool_choice` for chat models, in the Hermes / Qwen2.5 `<tool_call>` convention.

A model whose chat template renders `tools` itself (the template mentions them) gets them through
`apply_chat_template(..., tools=...)`. One whose template has no tool format (SmolLM2's ChatML, the
default model) gets the same listing Qwen2.5's template writes, in the system message: the function
signatures inside `<tools></tools>` and the instruction to answer with
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Either way the output is read with the
Hermes parser (`parse_tool_calls`); earlier calls and results in the history are rendered the same
way (assistant `<tool_call>` blocks, tool results as `<tool_response>` user turns).

`tool_choice`: "none" (no listing, no parsing), "auto" (listing; free text, calls parsed out),
"required" and a named function (the output is constrained by a JSON schema, as vLLM does: a
non-empty array of `{"name", "parameters"}` for "required", the function's parameters for a named
one; the result is always a tool call).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from redknot_rag.sampling import InvalidRequestError

ToolMode = Literal["none", "auto", "required", "named"]
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)
TOOL_CALL_START = "<tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = ""

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools. `functions` are OpenAI `function` objects (name, description,
    parameters), in request order."""

    mode: ToolMode
    functions: tuple[dict[str, Any], ...] = ()
    named: str | None = None
    parallel: bool = True

    @property
    def lists_tools(self) -> bool:
        return self.mode != "none" and bool(self.functions)

    def parameters(self, name: str) -> dict[str, Any]:
        f = next(f for f in self.functions if f["name"] == name)
        return f.get("parameters") or {"type": "object", "properties": {}}

    def json_schema(self) -> str | None:
        """The output constraint for "required" / a named function; None for "auto" and "none"."""
        if self.mode == "named":
            assert self.named is not None
            return json.dumps(self.parameters(self.named))
        if self.mode != "required":
            return None
        one = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "parameters": self.parameters(f["name"])},
                "required": ["name", "parameters"],
            }
            for f in self.functions
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one}}
        if not self.parallel:
            schema["maxItems"] = 1
        return json.dumps(schema)

    def system_prompt(self) -> str:
        """Qwen2.5's tool listing (what its chat template writes), for templates without one."""
        sigs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in self.functions)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{sigs}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def read_output(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output. Calls the plan cannot read stay content."""
        if self.mode == "none" or not self.functions:
            return text, []
        if self.mode == "named":
            assert self.named is not None
            try:
                args = json.loads(text)
            except json.JSONDecodeError:  # cut by max_tokens before the JSON closed
                return text, []
            return None, [ToolCall(self.named, json.dumps(args, ensure_ascii=False))]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []
            calls = [ToolCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
            return None, calls
        return parse_tool_calls(text, {f["name"] for f in self.functions})


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Hermes parser: every `<tool_call>{"name", "arguments"}</tool_call>` block (the last may lack its
    closing tag when the model stopped right after the JSON). A block that is not valid JSON or names an
    unknown function is left in the content, as vLLM's Hermes parser does."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL_RE.finditer(text):
        call = _read_call(m.group(1), names)
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _read_call(raw: str, names: set[str]) -> ToolCall | None:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(str(obj["name"]), json.dumps(args, ensure_ascii=False))


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan:
    """Validate OpenAI `tools` / `tool_choice`; every problem is an InvalidRequestError (HTTP 400)."""
    functions: list[dict[str, Any]] = []
    for i, t in enumerate(tools or []):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise InvalidRequestError(f"tools[{i}]: expected {{'type': 'function', 'function': {{...}}}}")
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise InvalidRequestError(f"tools[{i}].function.name must match [A-Za-z0-9_.-]{{1,64}}")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object")
        if any(g["name"] == name for g in functions):
            raise InvalidRequestError(f"tools[{i}]: duplicate function name {name!r}")
        functions.append({k: v for k, v in f.items() if k in ("name", "description", "parameters")})
    parallel = parallel_tool_calls is not False
    choice = "auto" if tool_choice is None and functions else ("none" if tool_choice is None else tool_choice)
    for mode in ("none", "auto", "required"):
        if choice == mode:
            if mode != "none" and not functions:
                raise InvalidRequestError(f"tool_choice {mode!r} needs a non-empty tools list")
            return ToolPlan(mode, tuple(functions), None, parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(f["name"] == name for f in functions):
            raise InvalidRequestError(f"tool_choice names function {name!r}, which is not in tools")
        return ToolPlan("named", tuple(functions), str(name), parallel)
    raise InvalidRequestError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the model's own chat template has a tool format (it reads the `tools` variable)."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render_messages(messages: list[dict[str, Any]], plan: ToolPlan, native: bool) -> list[dict[str, Any]]:
    """Chat messages for the template: tool history in the `<tool_call>` / `<tool_response>` form, and
    (templates without a tool format) the tool listing prepended to the system message."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if m["role"] == "assistant" and calls and not native:
            blocks = [
                "<tool_call>\n"
                + json.dumps({"name": c["function"]["name"], "arguments": _args(c["function"]["arguments"])})
                + "\n</tool_call>"
                for c in calls
            ]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or ""] + blocks))})
        elif m["role"] == "tool" and not native:
            body = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + body}  # consecutive results
            else:
                out.append({"role": "user", "content": body})
        else:
            out.append(dict(m))
    if plan.lists_tools and not native:
        listing = plan.system_prompt()
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + listing).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _args(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


class ToolStream:
    """One streamed choice of a request with tools: content deltas are sent as the text grows, except
    what may be (the start of) a `<tool_call>` block; the calls are read when the choice finishes."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.sent = ""  # content already streamed; invariant: a prefix of the output text

    def delta(self, text: str) -> str:
        """New content to stream, given the cumulative output `text`."""
        if self.plan.mode in ("required", "named"):
            return ""  # the whole output is the call's JSON
        cut = text.find(TOOL_CALL_START)
        if cut < 0:  # hold back a possible partial "<tool_call>" at the end
            cut = next(
                (len(text) - k for k in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1)
                 if text.endswith(TOOL_CALL_START[:k])),
                len(text),
            )  # fmt: skip
        safe = text[:cut]
        if not safe.startswith(self.sent) or len(safe) == len(self.sent):
            return ""
        d, self.sent = safe[len(self.sent) :], safe
        return d

    def finish(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content not streamed yet, tool calls) once the output is complete."""
        content, calls = self.plan.read_output(text)
        if not calls:
            return (text[len(self.sent) :] if text.startswith(self.sent) else ""), []
        done, rest = self.sent.strip(), content or ""
        return (rest[len(done) :] if rest.startswith(done) else ""), calls


def chat_ids(tokenizer: Any, messages: list[dict[str, Any]], plan: ToolPlan) -> list[int]:
    """Prompt token ids of a chat with tools (native template rendering where the template has one)."""
    from redknot_rag.chat import chat_prompt_ids, encode

    native = template_renders_tools(tokenizer)
    msgs = render_messages(messages, plan, native)
    if native and plan.lists_tools:
        for m in msgs:  # templates with a tool format read arguments as objects
            for c in m.get("tool_calls") or []:
                c["function"]["arguments"] = _args(c["function"]["arguments"])
        specs = [{"type": "function", "function": f} for f in plan.functions]
        text = tokenizer.apply_chat_template(msgs, tools=specs, tokenize=False, add_generation_prompt=True)
        return encode(tokenizer, text)
    return chat_prompt_ids(tokenizer, msgs)
