"""The HTTP side of `poelm serve`: routes, security and streaming (the command: poelm/cli/serve.py).

    poelm serve runs/base --delta chat=out/chat --port 8000 --api-key KEY
    app = create_app(registry, scheduler, metrics, ServeConfig())      # a FastAPI app

Routes: GET /health, GET /metrics, GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (streamed as server-sent events ending in `data: [DONE]`), and vLLM's
POST /tokenize and POST /detokenize.
Every error is {"error": {"message", "type", "param", "code"}} with one line of message:
400 bad request, 401 missing/wrong bearer token, 404 unknown model or route, 408 body not sent
within --header-timeout, 413 body too large, 503 (+ Retry-After) models still loading (/health
says "loading"), queue full or shutting down,
504 per-request timeout. Connections are bounded by guard.py (header deadline, connection cap).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from poelm.engine import ContextLengthError, ConstraintError, DecodeOptions, OptionError, compile_constraint
from poelm.engine.options import POE, TOP, request_fields, request_param, shown
from poelm.serve.guard import ConnectionGuard
from poelm.serve.metrics import Metrics
from poelm.serve.models import ModelRegistry, ServedModel
from poelm.serve.protocol import (ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, PoeOptions, Sampling,
                                  TokenizeChatRequest, TokenizeRequest, chat_logprobs, check_unsupported,
                                  completion_logprobs, parse_request, request_constraint, usage)
from poelm.serve.scheduler import LOGPROB_MODES, Job, Scheduler

API_KEY_ENV = "POELM_API_KEY"
MAX_STOP = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20


@dataclass
class ServeConfig:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens: int | None = None  # None: the model's context
    max_prompt_tokens: int | None = None  # None: the model's context
    max_n: int = 8
    request_timeout: float = 600.0
    header_timeout: float = 10.0  # seconds to send a request, header (guard.py) and body (read_body)


# -----------------------------------------------------------------------------
# Requests -> jobs


def decode_options(req: Sampling, served: ServedModel, max_tokens: int, stop: list[str]) -> DecodeOptions:
    """The request's DecodeOptions: the generated fields (`poe` and top-level) by name, OpenAI's
    own fields with OpenAI's defaults (temperature and top_p 1)."""
    poe = req.poe or PoeOptions()
    options = {f.name: getattr(poe, f.name) for f in request_fields(POE)}
    options.update({f.name: getattr(req, f.name) for f in request_fields(TOP)})
    options.update(max_new_tokens=max_tokens, stop_strings=stop, temperature=1.0 if req.temperature is None else req.temperature,
                   top_p=1.0 if req.top_p is None else req.top_p)
    if req.logit_bias is not None:
        options["logit_bias"] = token_keys(req.logit_bias, served.model.config.vocab_size)
    return served.engine.options(options)  # the engine's validation: one line per bad value, BP refusal


def structured(req: Sampling, served: ServedModel, opts: DecodeOptions) -> None:
    """Compile the request's structured-output field into opts.constraint (ApiError(400) naming the field)."""
    found = request_constraint(req)
    if found is None:
        return
    field, constraint = found
    try:
        opts.constraint = compile_constraint(constraint, served.engine.tokenizer, served.engine.stop_ids(opts),
                                             served.model.config.vocab_size)
    except ConstraintError as e:
        raise ApiError(400, f"{field}: {e.detail}", param=field) from None


def token_keys(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """logit_bias's JSON keys (strings) -> integers, 400 for a key that is not one (the engine
    refuses an integer that is not a token id of the model, in the same words)."""
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise ApiError(400, f"logit_bias key {shown(key)} is not a token id of this model: ids lie in "
                           f"[0, {vocab_size})", param="logit_bias")
        out[int(key)] = value
    return out


def check_common(req: Sampling, config: ServeConfig, context: int, max_tokens: int | None, param: str) -> tuple[int, list[str]]:
    """-> (max_tokens, stop strings) after the limits every endpoint shares."""
    check_unsupported(req)
    if not 1 <= req.n <= config.max_n:
        raise ApiError(400, f"n must lie in 1..{config.max_n} (--max-n), got {req.n}", param="n")
    limit = min(config.max_tokens or context, context)
    max_tokens = context if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= limit:
        raise ApiError(400, f"{param} must lie in 1..{limit}, got {max_tokens}", param=param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or not all(stop):
        raise ApiError(400, f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
    return max_tokens, stop


def check_prompt(ids: list[int], config: ServeConfig, context: int) -> list[int]:
    limit = min(config.max_prompt_tokens or context, context)
    if len(ids) > limit:
        raise ApiError(400, f"the prompt has {len(ids)} tokens but at most {limit} fit (the context holds {context}); "
                       "shorten it", param="prompt", code="context_length_exceeded")
    return ids


def encode(served: ServedModel, prompt, param: str) -> list[int]:
    try:
        return served.engine.encode_prompt(prompt)
    except ContextLengthError as e:
        raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None


def prompts_of(req: CompletionRequest) -> list:
    """The request's prompts: one string or token-id list, or a list of them."""
    p = req.prompt
    return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


def echo_texts(req: CompletionRequest, served: ServedModel) -> list[str]:
    """echo: each row's prompt as text (token ids decoded), in the order of the job's rows."""
    tok = served.engine.tokenizer
    return [q if isinstance(q, str) else tok.decode(q) for q in prompts_of(req) for _ in range(req.n)]


def completion_job(req: CompletionRequest, served: ServedModel, config: ServeConfig, loop) -> tuple[Job, int]:
    """-> (job, prompt tokens)."""
    context = served.model.config.sequence_len
    max_tokens, stop = check_common(req, config, context, req.max_tokens, "max_tokens")
    prompts = prompts_of(req)
    if not prompts:
        raise ApiError(400, "prompt is empty: give a string, a list of strings or token ids", param="prompt")
    ids = [check_prompt(encode(served, q, "prompt"), config, context) for q in prompts]
    if req.echo and req.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported (the prompt's logprobs are not computed); drop one",
                       param="echo")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must lie in 0..{MAX_COMPLETION_LOGPROBS}, got {req.logprobs}", param="logprobs")
    return make_job(req, served, ids, max_tokens, stop, req.logprobs, config, loop, "max_tokens"), sum(map(len, ids))


def chat_job(req: ChatRequest, served: ServedModel, config: ServeConfig, loop) -> tuple[Job, int]:
    from poelm.chat import render_prompt
    from poelm.chat import check_chat_tokenizer

    context = served.model.config.sequence_len
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, "give max_completion_tokens or max_tokens, not both", param="max_tokens")
    param = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
    asked = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    try:
        check_chat_tokenizer(served.engine.tokenizer, served.id)
        ids = render_prompt(served.engine.tokenizer, [{"role": m.role, "content": m.content} for m in req.messages])
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    check_prompt(ids, config, context)
    if asked is None:  # OpenAI's default: as many as fit
        asked = max(1, min(config.max_tokens or context, context) - len(ids))
    max_tokens, stop = check_common(req, config, context, asked, param)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must lie in 0..{MAX_TOP_LOGPROBS}, got {req.top_logprobs}", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return make_job(req, served, [ids], max_tokens, stop, logprobs, config, loop, param), len(ids)


def make_job(req: Sampling, served: ServedModel, prompts: list[list[int]], max_tokens: int, stop: list[str],
             logprobs: int | None, config: ServeConfig, loop, max_param: str) -> Job:
    """max_param: the request field that gave max_tokens (a refusal names the request's fields)."""
    try:
        opts = decode_options(req, served, max_tokens, stop)
    except OptionError as e:
        def param(field: str | None) -> str | None:
            return max_param if field == "max_new_tokens" else request_param(field)

        raise ApiError(400, e.said(lambda field: param(field) or field), param=param(e.option)) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    structured(req, served, opts)
    try:
        model = served.variant(req.poe.head_mode if req.poe else None)
    except ValueError as e:
        raise ApiError(400, str(e), param="poe.head_mode") from None
    if logprobs is not None and opts.mode not in LOGPROB_MODES:
        raise ApiError(400, f"logprobs are reported in poe modes {', '.join(LOGPROB_MODES)}, not {opts.mode}",
                       param="logprobs")
    rows = [ids for ids in prompts for _ in range(req.n)]
    return Job(served, model, rows, opts, served.engine.stop_ids(opts), loop, stream=req.stream, logprobs=logprobs,
               timeout_s=config.request_timeout)


def tokenize_kind(data: dict) -> type:
    return TokenizeChatRequest if "messages" in data else TokenizeRequest


def tokenized(req: TokenizeRequest | TokenizeChatRequest, served: ServedModel) -> dict:
    """vLLM's /tokenize answer: count, max_model_len, tokens (and token_strs when asked)."""
    from poelm.chat import check_chat_tokenizer, render_prompt

    tok = served.engine.tokenizer
    try:
        if isinstance(req, TokenizeChatRequest):
            check_chat_tokenizer(tok, served.id)
            ids = render_prompt(tok, [{"role": m.role, "content": m.content} for m in req.messages])
        else:
            ids = list(tok.encode(req.prompt))
            bos = served.engine.bos_id()
            if req.add_special_tokens and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
    except ValueError as e:
        param = "messages" if isinstance(req, TokenizeChatRequest) else "prompt"
        raise ApiError(400, f"{param}: {e}", param=param) from None
    return {"count": len(ids), "max_model_len": served.model.config.sequence_len, "tokens": ids,
            "token_strs": [tok.decode([i]) for i in ids] if req.return_token_strs else None}


# -----------------------------------------------------------------------------
# Responses


def sse(obj) -> str:
    """One server-sent event of obj. ASCII JSON: SSE splits lines at CR and LF only, but clients that
    read the stream with str.splitlines semantics (httpx's iter_lines, so guidellm) also split at
    U+0085, U+2028 and U+2029, which ensure_ascii=False would write raw inside a JSON string and a
    random model's text does produce; escaped, every client sees one line per event."""
    return f"data: {json.dumps(obj, allow_nan=False)}\n\n"  # NaN is not JSON


json_str = json.JSONEncoder().encode  # a str as sse() writes it (one encoder, not one per call)


def merge_chunks(payloads: list[list[tuple]]) -> list[tuple]:
    """Consecutive chunk events -> one (row, text offset, delta, logprob entries, finish) per row:
    deltas are whole characters, so joining them never splits one."""
    merged: dict[int, tuple] = {}
    for payload in payloads:
        for row, start, delta, entries, finish in payload:
            if row in merged:
                first, text, seen, _ = merged[row]
                merged[row] = (first, text + delta, seen + list(entries), finish)
            else:
                merged[row] = (start, delta, list(entries), finish)
    return [(row, *rest) for row, rest in merged.items()]


class Responder:
    """The response objects of one request (completion or chat, whole or streamed)."""

    def __init__(self, job: Job, chat: bool, prompt_tokens: int, include_usage: bool, continuous_usage: bool = False,
                 echo: list[str] | None = None):
        """continuous_usage: usage in every chunk (vLLM's stream_options); echo: each row's prompt
        text, put before its completion."""
        self.job, self.chat, self.prompt_tokens, self.include_usage = job, chat, prompt_tokens, include_usage
        self.continuous_usage, self.echo = continuous_usage, echo
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.tok = job.served.engine.tokenizer
        # the common chunk (no logprobs, not the last, no usage) as sse() writes it: this opening, the
        # row, this middle, the delta as a JSON string, the close (what a chunk costs is per token)
        self.opening = "data: " + json.dumps(self.head(True))[:-1] + ', "choices": [{"index": '
        self.middle = ', "logprobs": null, "finish_reason": null, ' + ('"delta": ' if chat else '"text": ')

    def head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.job.served.id}

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(len(t) for t in self.job.collector.tokens))

    def logprobs(self, entries, row: int, start: int):
        if self.job.logprobs is None:
            return None
        return chat_logprobs(entries, self.tok) if self.chat else completion_logprobs(entries, self.tok, start)

    def whole(self) -> dict:
        job, choices = self.job, []
        for b in range(len(job.rows)):
            choice = {"index": b, "logprobs": self.logprobs(job.logprob_entries(b), b, 0), "finish_reason": job.finish_reason(b)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": job.text(b), "refusal": None}
            else:
                choice["text"] = (self.echo[b] if self.echo else "") + job.text(b)
            choices.append(choice)
        return dict(self.head(False), choices=choices, usage=self.usage(), poe=job.poe)

    def chunk(self, row: int, start: int, delta: str, entries, finish: str | None) -> str:
        """The SSE event of one choice's delta (text from offset start on)."""
        if finish is None and self.job.logprobs is None and not self.continuous_usage:  # = sse(the dict below)
            if self.chat:
                value = '{"content": ' + json_str(delta) + "}" if delta else "{}"
            else:
                value = json_str(delta)
            return f"{self.opening}{row}{self.middle}{value}}}]}}\n\n"
        choice = {"index": row, "logprobs": self.logprobs(entries, row, start), "finish_reason": finish}
        if self.chat:
            choice["delta"] = {"content": delta} if delta else {}
        else:
            choice["text"] = delta
        out = dict(self.head(True), choices=[choice])
        if finish is not None and self.job.poe is not None:
            out["poe"] = self.job.poe
        if self.continuous_usage:
            out["usage"] = self.usage()
        return sse(out)

    async def stream(self):
        job = self.job
        try:
            if self.chat:
                for b in range(len(job.rows)):
                    yield sse(dict(self.head(True), choices=[{"index": b, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]))
            for b, text in enumerate(self.echo or ()):
                yield self.chunk(b, 0, text, [], None)
            while True:
                events = [await job.events.get()]
                while not job.events.empty():  # the client fell behind: what waits goes out in one write
                    events.append(job.events.get_nowait())
                payloads = [payload for kind, payload in events if kind == "chunk"]
                merged = payloads[0] if len(payloads) == 1 else merge_chunks(payloads)  # one: nothing to merge
                out = [self.chunk(*c) for c in merged]
                kind, payload = events[-1]  # an end or error comes last
                if kind == "error":
                    out.append(sse(payload.body()))
                elif kind == "end" and self.include_usage:
                    out.append(sse(dict(self.head(True), choices=[], usage=self.usage(), poe=job.poe)))
                if kind != "chunk":
                    yield "".join(out) + "data: [DONE]\n\n"
                    break
                yield "".join(out)
        finally:
            job.cancelled = True  # a client that left frees its rows at the next step (no-op once done)


# -----------------------------------------------------------------------------
# The app


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, 413 beyond `limit` bytes, 408 when it has not arrived within timeout_s."""
    try:
        return await asyncio.wait_for(receive_body(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (--header-timeout)") from None


async def receive_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit} (--max-body-bytes)")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes (--max-body-bytes)")
    return bytes(body)


class BearerAuth:
    """ASGI middleware: 401 without `Authorization: Bearer KEY` (but on /health). Plain ASGI, so a
    streamed response passes through untouched (@app.middleware would relay every chunk)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(ApiError(401, "missing or wrong API key: send the header "
                                                        "'Authorization: Bearer KEY' (--api-key)", code="invalid_api_key"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(registry: ModelRegistry, scheduler: Scheduler, metrics: Metrics, config: ServeConfig,
               guard: ConnectionGuard | None = None) -> FastAPI:
    """The app; with `guard`, the event loop reports accept() errors through its rate-limited log."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if guard is not None:
            asyncio.get_running_loop().set_exception_handler(guard.loop_exception)
        if not scheduler.alive():
            scheduler.start()
        yield
        scheduler.drain()  # uvicorn has let the in-flight requests finish by now
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="poelm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, e: ClientDisconnect):
        return Response(status_code=499)  # the client left while sending its request: never sent, no traceback

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(ApiError(e.status_code, message))

    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)

    @app.get("/health")
    async def health():
        ok = scheduler.alive() and not scheduler.draining and not registry.loading
        status = "ok" if ok else "loading" if registry.loading else "unavailable"
        return JSONResponse({"status": status, "models": list(registry.models),
                             **scheduler.load()}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        registry.check_loaded()
        return {"object": "list", "data": [m.card() for m in registry.models.values()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        return registry.get(model_id).card()

    async def run(request: Request, chat: bool):
        kind = ChatRequest if chat else CompletionRequest
        req = parse_request(kind, await read_body(request, config.max_body_bytes, config.header_timeout))
        served = registry.get(req.model)
        try:
            if not chat:  # before encoding: a long list of prompts would hold the event loop first
                scheduler.check_rows(len(prompts_of(req)) * req.n)
            job, prompt_tokens = (chat_job if chat else completion_job)(req, served, config, asyncio.get_running_loop())
            scheduler.submit(job)
        except ApiError as e:
            metrics.refused(served.id, e.status)
            raise
        metrics.prompted(served.id, prompt_tokens * req.n)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and req.stream_options.continuous_usage_stats  # as vLLM: with include_usage
        echo = echo_texts(req, served) if not chat and req.echo else None
        responder = Responder(job, chat, prompt_tokens, include_usage, continuous, echo)
        if req.stream:
            return StreamingResponse(responder.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True  # its rows leave at the next step; nobody reads an answer
                    return Response(status_code=499)  # "client closed request": never sent
                continue
            if kind == "error":
                raise payload
            if kind == "end":
                return responder.whole()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse_request(tokenize_kind, await read_body(request, config.max_body_bytes, config.header_timeout))
        served = registry.get(req.model) if req.model is not None else registry.first()
        return tokenized(req, served)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse_request(DetokenizeRequest, await read_body(request, config.max_body_bytes, config.header_timeout))
        served = registry.get(req.model) if req.model is not None else registry.first()
        vocab = served.model.config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"tokens: {bad} is not a token id of this model: ids lie in [0, {vocab})", param="tokens")
        return {"prompt": served.engine.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    return app
