"""Request and response shapes of the OpenAI-compatible API, and its error objects.

    req = parse_request(CompletionRequest, body_bytes)      # ApiError(400) with one line if bad
    raise ApiError(404, "model 'x' does not exist", param="model", code="model_not_found")

Requests are checked strictly (types are not coerced: "10" is not an integer); a field this
server does not implement is refused by name rather than ignored, except the ones that
change nothing at their default value (echo=false, presence_penalty=0, ...). Extra fields
beyond OpenAI's: `repetition_penalty`, `top_k` and `poe` (the PoE decoding mode).
"""

from __future__ import annotations

import json
import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from poelm.engine import MODES, Constraint

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               408: "timeout", 413: "invalid_request_error", 503: "server_overloaded", 504: "timeout", 500: "server_error"}
MAX_MESSAGE = 400  # characters of an error message: a value it echoes is cut, not sent back whole


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


Number = Union[StrictInt, float]  # strict mode: an int is a valid float, a string or bool is not


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PoeOptions(Strict):
    """The PoE decoding mode of a request (docs/poe.md §2-6), e.g. {"mode": "speculative", "gamma": 4}."""

    mode: Literal[MODES] = "final"
    stage: StrictInt | None = None
    stages: list[StrictInt] | None = None
    logop_alpha: Number | None = None
    draft_stage: StrictInt = 0
    gamma: StrictInt = 4
    adaptive_gamma: StrictBool = False
    draft_threshold: Number | None = None
    wand_factor: Number = 1.0
    head_mode: Literal["dual", "base", "spec"] | None = None
    force: StrictBool = False  # run a PoE mode on a BP model anyway (research)


class StreamOptions(Strict):
    include_usage: StrictBool = False


class JsonSchemaFormat(Strict):
    """response_format.json_schema: the schema the reply must match (`strict` changes nothing: it always must)."""

    name: StrictStr
    description: StrictStr | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's structured_outputs: one of a JSON schema, a regex, a Lark/GBNF grammar, a choice of strings."""

    json_: dict | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    grammar: StrictStr | None = None
    choice: list[StrictStr] | None = None


class Structured(Strict):
    """The structured-output fields (request_constraint reads the one a request sets)."""

    response_format: ResponseFormat | None = None
    guided_json: dict | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_grammar: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    structured_outputs: StructuredOutputs | None = None


GUIDED = {"json": "json_schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}  # vLLM's key -> kind


def request_constraint(req: Structured) -> tuple[str, Constraint] | None:
    """(the request field, its Constraint) of the structured-output field a request sets (None:
    free text); ApiError(400) for a json_schema format without a schema or more than one field."""
    found = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", Constraint("json_object")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format of type json_schema needs json_schema.schema", param="response_format.json_schema")
        found.append(("response_format.json_schema.schema", Constraint("json_schema", fmt.json_schema.schema_)))
    for key, kind in GUIDED.items():
        for name, value in ((f"guided_{key}", getattr(req, f"guided_{key}")),
                            (f"structured_outputs.{key}", getattr(req.structured_outputs, "json_" if key == "json" else key, None))):
            if value is not None:
                found.append((name, Constraint(kind, value)))
    if len(found) > 1:
        raise ApiError(400, f"give one structured-output field, not both {found[0][0]} and {found[1][0]}", param=found[1][0])
    return found[0] if found else None


class Sampling(Structured):
    """Fields both endpoints share."""

    model: StrictStr
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = None  # None: the OpenAI default 1
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: Number | None = None  # accepted at 0 only
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None  # accepted empty only
    user: StrictStr | None = None  # ignored
    repetition_penalty: Number = 1.0
    top_k: StrictInt = 0
    poe: PoeOptions | None = None


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None  # 0..5 top alternatives per token
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: StrictStr
    content: StrictStr
    name: StrictStr | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None  # 0..20, needs logprobs=true


def parse_request(kind: type[Strict], body: bytes) -> Strict:
    """JSON bytes -> a request model, or ApiError(400) with one line naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # the decoder recurses per nesting level
        raise ApiError(400, "the request body nests arrays or objects too deeply to parse; flatten it") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "int", "list", "float", "union")))
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unsupported field {where!r}: this server does not implement it", param=where) from None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required field {where!r}", param=where) from None
        raise ApiError(400, f"{where}: {err['msg']} (got {_short(err.get('input'))})", param=where) from None


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_unsupported(req: Sampling) -> None:
    """Refuse OpenAI features this server does not implement unless at their no-op value."""
    if req.presence_penalty not in (None, 0):
        raise ApiError(400, "presence_penalty is not supported; use repetition_penalty (an extra field)",
                       param="presence_penalty")
    if req.frequency_penalty not in (None, 0):
        raise ApiError(400, "frequency_penalty is not supported; use repetition_penalty (an extra field)",
                       param="frequency_penalty")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported; use n", param="best_of")
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")


FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length", "context": "length"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list, tokenizer, start: int = 0) -> dict:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    def alternatives(top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, lp in top:  # ids whose text is alike (partial UTF-8 -> U+FFFD) keep the likeliest
            out.setdefault(tokenizer.decode([i]), lp)
        return out

    tokens, offsets, offset = [], [], start
    for e in entries:
        text = tokenizer.decode([e.token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [alternatives(e.top) for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list, tokenizer) -> dict:
    """Chat logprobs: content = [{token, logprob, bytes, top_logprobs: [...]}]."""
    def item(i: int, lp: float) -> dict:
        return {"token": tokenizer.decode([i]), "logprob": lp, "bytes": list(tokenizer.decode_bytes([i]))}

    return {"content": [dict(item(e.token, e.logprob), top_logprobs=[item(i, lp) for i, lp in e.top]) for e in entries],
            "refusal": None}
