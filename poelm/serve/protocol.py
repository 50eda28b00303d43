"""Request and response shapes of the OpenAI-compatible API, and its error objects.

    req = parse_request(CompletionRequest, body_bytes)      # ApiError(400) with one line if bad
    raise ApiError(404, "model 'x' does not exist", param="model", code="model_not_found")

Requests are checked strictly (types are not coerced: "10" is not an integer); a field this
server does not implement is refused by name rather than ignored, except the ones that
change nothing at their default value (best_of=1, suffix=""). The decoding fields are
generated from DecodeOptions (poelm/engine/options.py): the top-level ones beyond OpenAI's
(`repetition_penalty`, `top_k`, `min_p`, `stop_token_ids`, `ignore_eos`, `min_tokens`, ...) and
`poe` (the PoE decoding mode), with the Python API's names and defaults.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, create_model

from poelm.engine import Constraint, DecodeOptions
from poelm.engine.options import POE, TOP, request_fields
from poelm.engine.registry import option_choices
from poelm.model import HEAD_MODES

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
STRICT = {bool: StrictBool, int: StrictInt, float: Number, str: StrictStr}  # a Python type's strict request type


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def request_type(hint, choices: tuple[str, ...] | None):
    """The strict pydantic type of a DecodeOptions field's type hint (a JSON object's keys are
    strings: dict[int, float] is carried as dict[str, number])."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if isinstance(hint, types.UnionType) else hint
    if choices:
        base = Literal[choices]
    elif typing.get_origin(base) is list:
        base = list[STRICT[typing.get_args(base)[0]]]
    elif typing.get_origin(base) is dict:
        base = dict[StrictStr, STRICT[typing.get_args(base)[1]]]
    else:
        base = STRICT[base]
    return base | None if optional else base


def option_fields(where: str) -> dict:
    """create_model's field definitions of the DecodeOptions fields a request carries at `where`:
    the same names and defaults as the Python API."""
    hints, choices = typing.get_type_hints(DecodeOptions), option_choices()
    out = {}
    for f in request_fields(where):
        default = Field(default_factory=f.default_factory) if f.default is MISSING else f.default
        out[f.name] = (request_type(hints[f.name], choices.get(f.name)), default)
    return out


PoeOptions = create_model(
    "PoeOptions", __base__=Strict, __doc__="The PoE decoding mode of a request (docs/poe.md §2-6), e.g. "
    '{"mode": "speculative", "gamma": 4}: the DecodeOptions fields declared for `poe`, and the readout head.',
    head_mode=(Literal[HEAD_MODES] | None, None), **option_fields(POE))


class StreamOptions(Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: usage in every chunk


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


class OpenAISampling(Structured):
    """Fields both endpoints share that OpenAI declares (its names and defaults)."""

    model: StrictStr
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = None  # None: the OpenAI default 1
    top_p: Number | None = None
    stop: StrictStr | list[StrictStr] | None = None
    user: StrictStr | None = None  # ignored
    poe: PoeOptions | None = None


Sampling = create_model("Sampling", __base__=OpenAISampling, __doc__="Fields both endpoints share: OpenAI's, and "
                        "the top-level DecodeOptions fields (repetition_penalty, top_k, min_p, logit_bias, ...).",
                        **option_fields(TOP))


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


class TokenizeRequest(Strict):
    """vLLM's POST /tokenize of a prompt."""

    model: StrictStr | None = None  # None: the first model
    prompt: StrictStr
    add_special_tokens: StrictBool = True  # prepend <|bos|>
    return_token_strs: StrictBool = False


class TokenizeChatRequest(Strict):
    """vLLM's POST /tokenize of a conversation (rendered as for a chat completion)."""

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: Literal[True] = True  # the rendering ends with <|assistant_start|>
    return_token_strs: StrictBool = False


class DetokenizeRequest(Strict):
    model: StrictStr | None = None
    tokens: list[StrictInt]


def parse_request(kind, body: bytes) -> Strict:
    """JSON bytes -> a request model, or ApiError(400) with one line naming the field. `kind`: the
    model's class, or a function of the JSON object that picks it."""
    data = parse_json(body)
    if not isinstance(kind, type):
        kind = kind(data)
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "int", "list", "float", "union", "literal")))
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unsupported field {where!r}: this server does not implement it", param=where) from None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required field {where!r}", param=where) from None
        raise ApiError(400, f"{where}: {err['msg']} (got {_short(err.get('input'))})", param=where) from None


def parse_json(body: bytes) -> dict:
    """A request body -> its JSON object, or ApiError(400)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # the decoder recurses per nesting level
        raise ApiError(400, "the request body nests arrays or objects too deeply to parse; flatten it") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_unsupported(req: Sampling) -> None:
    """Refuse OpenAI features this server does not implement unless at their no-op value."""
    if isinstance(req, CompletionRequest):
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
