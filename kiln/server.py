"""`kiln serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one Engine or EmbeddingEngine.
Each request becomes Engine.submit calls; a thread per engine request carries its text from the engine's loop
thread to the event loop, which never blocks. Prometheus metrics at /metrics, OpenAI's error JSON throughout."""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import json
import re
import socket
import sys
import threading
import time
import uuid
from typing import NamedTuple

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.ir.errors import ConfigError, KilnError

DEFAULT_MAX_QUEUED = 64
MAX_BODY_BYTES = 8 * 2**20  # a prompt of the longest compiled sequence is far smaller
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
RETRY_AFTER_SECONDS = 1
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# OpenAI fields an engine error may start with (the engine's keywords of the same name)
REQUEST_FIELDS = {"n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
                  "response_format"}

# OpenAI fields that map to an Engine.submit keyword of the same name which this kiln may not have yet: until
# it does, a value that changes nothing is accepted and any other is refused, naming the field
OPTIONAL_ENGINE_FIELDS = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
                          "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def _bad_value(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _not_supported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported by this kiln yet ({why}); leave it out or at its default",
                    param=param, code="unsupported_parameter")


# mapping the engine's one-line errors onto the field the client sent -----------------------------------------
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")


def engine_error(err: BaseException, *, max_tokens_field: str, prompt_field: str, admitted: bool = False) -> ApiError:
    """An Engine's error as OpenAI's: ConfigErrors name their field (SamplingParams.top_p, max_new_tokens, the
    prompt); after admission, only one about the request's size is the client's fault."""
    message = " ".join(str(err).split())
    if isinstance(err, ConfigError) and "engine was closed" in message:
        return ApiError(503, "the server is shutting down; retry on another instance", type="server_error",
                        code="shutting_down")
    if not isinstance(err, ConfigError) or (admitted and "max_new_tokens" not in message):
        return ApiError(500, f"kiln failed the request: {message}", type="server_error", code="internal_error")
    found = _SAMPLING_FIELD.search(message)
    if found:
        param = found.group(1)
        message = message.replace("SamplingParams.", "")
        if param == "max_new_tokens":
            param = max_tokens_field
    elif "max_new_tokens" in message:
        param = max_tokens_field
    elif message.split(" ", 1)[0].removesuffix("'s") in REQUEST_FIELDS:
        param = message.split(" ", 1)[0].removesuffix("'s")
    elif "prompt" in message or "chat" in message or "token ids" in message:
        param = prompt_field
    else:
        param = None
    message = message.replace("max_new_tokens", max_tokens_field)
    code = "context_length_exceeded" if "compiled maximum" in message or "pages" in message else "invalid_value"
    return ApiError(400, message, param=param, code=code)


# reading requests --------------------------------------------------------------------------------------------
async def read_json_body(request: HttpRequest, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, more than this server's limit of "
                            f"{limit:,}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is more than this server's limit of {limit:,} bytes",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({' '.join(str(err).split())[:200]}); send one "
                            f"JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(data).__name__}",
                       code="invalid_json")
    return data


def _optional_bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad_value(name, f"{name} must be true or false, got {value!r}")
    return value


def _stop_strings(body: dict):
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad_value("stop", f"stop must be a string or a list of strings, got {json.dumps(stop)[:100]}")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad_value("stop", f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    return stop


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad_value("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(options, dict):
        raise _bad_value("stream_options", f"stream_options must be an object, got {json.dumps(options)[:100]}")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise _bad_value("stream_options.include_usage", f"stream_options.include_usage must be true or false, "
                                                         f"got {value!r}")
    return value


def _choices_per_prompt(body: dict, engine_has_n: bool) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _bad_value("n", f"n must be an integer >= 1, got {n!r}")
    if n != 1 and not engine_has_n:
        raise _not_supported("n", "the engine cannot sample several completions of one prompt")
    return n


def _logprob_kwargs(body: dict, chat: bool, engine_has_logprobs: bool) -> dict:
    """Engine keywords from OpenAI's logprobs fields: chat's logprobs (bool) and top_logprobs (int), or the
    completions API's logprobs (int: how many alternatives)."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if not chat and logprobs is not None:
        logprobs, top = True, logprobs
    if logprobs in (None, False) and top in (None, 0):
        return {}
    if not engine_has_logprobs:
        raise _not_supported("logprobs" if logprobs not in (None, False) else "top_logprobs",
                             "the engine does not report log-probabilities")
    return {"logprobs": logprobs, "top_logprobs": 0 if top is None else top}


def _chat_messages(body: dict) -> list:
    """The messages as the chat template reads them: role and text content (text parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad_value("messages", "messages must be a non-empty list of {role, content} objects")
    cleaned = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad_value(where, f"{where} must be an object with a string role")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad_value(f"{where}.content", f"{where}.content may hold only text parts "
                                                         f"({{\"type\": \"text\", \"text\": ...}}); kiln's models "
                                                         f"read text")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad_value(f"{where}.content", f"{where}.content must be a string or a list of text parts")
        entry = {"role": message["role"], "content": content}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        cleaned.append(entry)
    return cleaned


def _completion_prompts(body: dict) -> list:
    """/v1/completions' prompt: a text, token ids, or a list of either (one choice each)."""
    prompt = body.get("prompt")
    expected = "prompt must be a string, a list of token ids, or a list of strings or of token-id lists"
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise _bad_value("prompt", f"{expected}, got {json.dumps(prompt)[:100]}")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if all(isinstance(p, str) or (isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p)) for p in prompt):
        return list(prompt)
    raise _bad_value("prompt", expected)


# carrying engine requests to the event loop -------------------------------------------------------------------
class Event(NamedTuple):
    """What one engine request did: new text (and its tokens' log-probabilities, when asked), or its end."""

    index: int  # the choice's index
    text: str | None  # None for the end
    logprobs: list | None
    end: object = None  # GenerationResult or the exception it failed with


def _events(request):
    """(text, logprobs) of a request as they come: Request.events where the engine has it, else its text."""
    if hasattr(request, "events"):
        return ((event.text, event.logprobs) for event in request.events())
    return ((piece, None) for piece in request.stream())


class Generations:
    """The engine requests of one HTTP request, read from the event loop: a thread per request waits on its
    events and end, and puts each on one asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_end, choices_per_prompt: int = 1):
        self.requests: list = []
        self.choices_per_prompt = choices_per_prompt
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_end = on_end  # called on the event loop with (result, error) as each request ends
        self.pending = 0

    def start(self, request) -> None:
        """Take one submitted engine request (called from a worker thread)."""
        index = len(self.requests)
        self.requests.append(request)
        self.pending += 1
        threading.Thread(target=self._pump, args=(index, request), name=f"kiln-serve-{request.id}",
                         daemon=True).start()

    def _pump(self, index: int, request) -> None:
        result, error = None, None
        try:
            for text, logprobs in _events(request):
                self._put(Event(index, text, logprobs))
            result = request.result()
        except BaseException as err:  # noqa: BLE001 - the request's failure is the client's answer
            error = err
        self._put(Event(index, None, None, error if error is not None else result))
        try:
            self._loop.call_soon_threadsafe(self._on_end, result, error)
        except RuntimeError:  # the event loop has closed: nobody is left to count it
            pass

    def _put(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (the server stopped): nobody reads it any more
            self.requests[event.index].cancel()

    async def next(self) -> Event | None:
        """The next event; None once every request has ended."""
        if self.pending == 0:
            return None
        event = await self._queue.get()
        if event.text is None:
            self.pending -= 1
        return event

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()


async def _until_disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """Server-sent events from an async iterator of byte strings; ``on_close`` runs however the stream ends
    (finished, client gone, server shutting down), so the requests behind it are always cancelled."""

    media_type = "text/event-stream"

    def __init__(self, events, on_close):
        # no body, so init_headers sets no Content-Length (as StreamingResponse does)
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write
            pass
        finally:
            self._on_close()


def sse(data) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


# metrics -----------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of the server's own: counters and latency histograms updated as requests
    end, and the engine's state (running, waiting, KV pages, prefix-cache hits) read at each scrape."""

    def __init__(self, server: "KilnServer"):
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("kiln_requests", "Engine requests ended, by finish reason (stop, length, "
                                                 "cancelled, error)", ["finish_reason"], registry=self.registry)
        self.rejected = Counter("kiln_requests_rejected", "Requests refused with 503 because the queue was full",
                                registry=self.registry)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.time_to_first_token = Histogram("kiln_time_to_first_token_seconds", "From submission to the first "
                                             "generated token", buckets=latency, registry=self.registry)
        # the engine times a request's decode steps as a whole: each token counts the request's mean interval
        self.inter_token_latency = Histogram("kiln_inter_token_latency_seconds", "Between generated tokens (each "
                                             "request's mean decode interval, once per decoded token)",
                                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                                             registry=self.registry)
        self.request_seconds = Histogram("kiln_request_seconds", "From submission to the end of a request",
                                         buckets=latency, registry=self.registry)
        self.registry.register(_EngineCollector(server))

    def observe(self, result, error) -> None:
        if error is not None:
            self.requests.labels("error").inc()
            return
        stats = result.stats
        self.requests.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(stats["prompt_tokens"])
        self.generation_tokens.inc(stats["new_tokens"])
        self.request_seconds.observe(stats["queue_seconds"] + stats["prefill_seconds"] + stats["decode_seconds"])
        if stats["new_tokens"]:
            self.time_to_first_token.observe(stats["time_to_first_token"])
        if stats["decode_steps"]:
            interval = stats["decode_seconds"] / stats["decode_steps"]
            for _ in range(stats["decode_steps"]):
                self.inter_token_latency.observe(interval)


class _EngineCollector:
    def __init__(self, server: "KilnServer"):
        self.server = server

    def collect(self):
        server = self.server
        scheduler = getattr(server.engine, "scheduler", None)
        running = len(scheduler.running) if scheduler is not None else min(server.in_flight, 1)
        yield GaugeMetricFamily("kiln_requests_running", "Engine requests in the running batch", value=running)
        yield GaugeMetricFamily("kiln_requests_waiting", "Engine requests admitted by the server and not running "
                                "yet", value=max(server.in_flight - running, 0))
        if scheduler is None:
            return
        pool = server.engine.pool
        yield GaugeMetricFamily("kiln_kv_cache_pages_in_use", "KV-cache pages held by requests",
                                value=pool.num_in_use())
        yield GaugeMetricFamily("kiln_kv_cache_pages", "KV-cache pages in all", value=pool.num_pages)
        queried, hit = pool.stats["prefix_queries_tokens"], pool.stats["prefix_hit_tokens"]
        yield CounterMetricFamily("kiln_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                                  value=queried)
        yield CounterMetricFamily("kiln_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  value=hit)
        yield GaugeMetricFamily("kiln_prefix_cache_hit_rate", "Prefix-cache hit tokens over queried tokens, since "
                                "start", value=hit / queried if queried else 0.0)


# the server --------------------------------------------------------------------------------------------------
class KilnServer:
    """The routes' shared state: the engine, the admission count behind back-pressure, and the metrics."""

    def __init__(self, engine, *, model_name: str, api_key: str | None, max_queued: int, max_body_bytes: int):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.embedding = hasattr(engine, "hidden_size")
        self.capacity = (1 if self.embedding else engine.max_running) + max_queued
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0  # engine requests admitted and not ended; touched on the event loop only
        self.created = int(time.time())
        self.metrics = Metrics(self)
        # what this engine's submit takes decides which OpenAI fields it serves (see OPTIONAL_ENGINE_FIELDS)
        self.engine_keywords = set() if self.embedding else set(inspect.signature(engine.submit).parameters)
        self.engine_has_n = hasattr(engine, "submit_n")
        self.embed_lock = asyncio.Lock()  # one embedding batch at a time on the backend

    # admission ------------------------------------------------------------------------------------------
    def admit(self, count: int) -> None:
        if count > self.capacity:
            raise ApiError(400, f"this request asks for {count} generations at once, more than this server runs "
                                f"and queues together ({self.capacity}); send fewer prompts", param="prompt")
        if self.in_flight + count > self.capacity:
            self.metrics.rejected.inc()
            raise ApiError(503, f"kiln is busy: {self.in_flight} requests are running or queued, the limit is "
                                f"{self.capacity}; retry in a moment", type="server_error", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.in_flight += count

    def release(self, count: int = 1) -> None:
        self.in_flight -= count
        assert self.in_flight >= 0, "released more engine requests than were admitted"

    def on_end(self, result, error) -> None:
        self.release()
        self.metrics.observe(result, error)

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_generative(self) -> None:
        if self.embedding:
            raise ApiError(400, f"{self.model_name!r} is an embedding model: it serves /v1/embeddings, not text "
                                f"generation", param="model", code="model_not_supported")

    def sampling_kwargs(self, body: dict, *, chat: bool, default_max_tokens: int | None) -> tuple[dict, int, str]:
        """Engine.submit's keywords from OpenAI's fields (the engine checks ranges), the completions per prompt,
        and the name under which the client gave the token limit."""
        max_tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(max_tokens_field)
        kwargs = {"max_new_tokens": default_max_tokens if max_tokens is None else max_tokens,
                  "stop": _stop_strings(body), "ignore_eos": _optional_bool(body, "ignore_eos")}
        defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                    "seed": None}  # OpenAI's defaults, then vLLM's extensions switched off
        for name, default in defaults.items():
            value = body.get(name)
            kwargs[name] = default if value is None else value
        if kwargs["top_k"] == -1:  # vLLM's spelling of "off"
            kwargs["top_k"] = 0
        for name, neutral in OPTIONAL_ENGINE_FIELDS.items():
            value = body.get(name)
            if name in self.engine_keywords:
                if value is not None:
                    kwargs[name] = value
            elif value not in neutral:
                raise _not_supported(name, f"the engine has no {name} yet")
        kwargs.update(_logprob_kwargs(body, chat, "logprobs" in self.engine_keywords))
        return kwargs, _choices_per_prompt(body, self.engine_has_n), max_tokens_field

    def submit(self, prompt, n: int, kwargs: dict) -> list:
        """One prompt's ``n`` engine requests (several share the prompt's pages through Engine.submit_n)."""
        if n == 1:
            return [self.engine.submit(prompt, **kwargs)]
        return self.engine.submit_n(prompt, n, **kwargs)

    async def start(self, calls: list, n: int, errors: dict) -> Generations:
        """Admit and run the calls (each submits one prompt's ``n`` requests) in a worker thread, so tokenizing
        and templating stay off the event loop; a refused call cancels the requests before it."""
        self.admit(len(calls) * n)
        generations = Generations(asyncio.get_running_loop(), self.on_end, n)

        def submit_all():
            for call in calls:
                for request in call():
                    generations.start(request)

        try:
            await asyncio.to_thread(submit_all)
        except BaseException as err:
            generations.cancel()
            self.release(len(calls) * n - len(generations.requests))
            if isinstance(err, KilnError):
                raise engine_error(err, **errors) from None
            raise
        return generations


def create_app(engine, *, model_name: str, api_key: str | None = None, max_queued: int = DEFAULT_MAX_QUEUED,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving ``engine`` (an Engine or an EmbeddingEngine) as ``model_name``."""
    server = KilnServer(engine, model_name=model_name, api_key=api_key, max_queued=max_queued,
                        max_body_bytes=max_body_bytes)
    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kiln = server

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                        code="not_found" if err.status_code == 404 else None).response()

    def authorize(request: HttpRequest) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key this "
                                "server was started with", code="invalid_api_key")

    guarded = [Depends(authorize)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "kiln",
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def get_model(model: str):
        server.check_model({"model": model})
        return model_card()

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: HttpRequest):
        body = await read_json_body(request, server.max_body_bytes)
        server.check_model(body)
        server.check_generative()
        prompts = _completion_prompts(body)
        stream = _optional_bool(body, "stream")
        include_usage = _include_usage(body, stream)
        if _optional_bool(body, "echo"):
            raise _not_supported("echo", "kiln returns only the generated text")
        if body.get("suffix") is not None:
            raise _not_supported("suffix", "kiln's models continue text, they do not fill in the middle")
        if body.get("best_of") is not None and body.get("best_of") != body.get("n", 1):
            raise _not_supported("best_of", "the engine does not rank completions")
        kwargs, n, max_tokens_field = server.sampling_kwargs(body, chat=False,
                                                             default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
        errors = {"max_tokens_field": max_tokens_field, "prompt_field": "prompt"}
        calls = [lambda p=p: server.submit(p, n, kwargs) for p in prompts]
        generations = await server.start(calls, n, errors)
        return await respond(request, generations, chat=False, stream=stream, include_usage=include_usage,
                             errors=errors)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: HttpRequest):
        body = await read_json_body(request, server.max_body_bytes)
        server.check_model(body)
        server.check_generative()
        messages = _chat_messages(body)
        stream = _optional_bool(body, "stream")
        include_usage = _include_usage(body, stream)
        if body.get("tools"):
            raise _not_supported("tools", "kiln does not call tools")
        explicit_limit = body.get("max_completion_tokens", body.get("max_tokens")) is not None
        kwargs, n, max_tokens_field = server.sampling_kwargs(body, chat=True, default_max_tokens=None)
        errors = {"max_tokens_field": max_tokens_field, "prompt_field": "messages"}

        def call():
            ids = engine.chat_prompt(messages)
            if not explicit_limit:  # OpenAI's default: as many tokens as the context has room for
                if len(ids) >= engine.max_seq_len:
                    raise ConfigError(f"the rendered chat is {len(ids)} tokens, leaving no room to generate in the "
                                      f"compiled maximum of {engine.max_seq_len}; shorten the messages")
                kwargs["max_new_tokens"] = engine.max_seq_len - len(ids)
            return server.submit(ids, n, kwargs)

        generations = await server.start([call], n, errors)
        return await respond(request, generations, chat=True, stream=stream, include_usage=include_usage,
                             errors=errors)

    async def respond(request: HttpRequest, generations: Generations, *, chat: bool, stream: bool,
                      include_usage: bool, errors: dict):
        """Wait for the first event before answering, so that a request refused after admission (too large for
        the KV cache) still gets its 4xx; then one JSON response or an event stream. A client that disconnects
        cancels its requests."""
        watcher = asyncio.create_task(_until_disconnected(request.receive))
        watcher.add_done_callback(lambda _: generations.cancel())

        def close():
            watcher.cancel()
            generations.cancel()

        streaming = False
        try:
            first = await generations.next()
            _raise_failure(first, errors)
            completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            if stream:
                streaming = True
                return EventStream(stream_chunks(generations, first, completion_id, chat=chat,
                                                 include_usage=include_usage, errors=errors), close)
            return await whole_response(generations, first, completion_id, chat=chat, errors=errors)
        finally:
            if not streaming:
                close()

    def _raise_failure(event: Event, errors: dict) -> None:
        if event.text is None and isinstance(event.end, BaseException):
            raise engine_error(event.end, admitted=True, **errors)

    def usage(results: dict, choices_per_prompt: int) -> dict:
        """OpenAI's usage: a prompt counts once however many completions it has (its first one's counts)."""
        firsts = [r for i, r in results.items() if i % choices_per_prompt == 0]
        prompt = sum(r.stats["prompt_tokens"] for r in firsts)
        completion = sum(r.stats["new_tokens"] for r in results.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(r.stats["cached_prompt_tokens"] for r in firsts)}}

    def token_text(token_id: int) -> str:
        return engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(logprobs: list | None):
        """OpenAI chat's {"content": [{token, logprob, bytes, top_logprobs}]} from the engine's TokenLogprobs."""
        if logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in
                                                                                t.top_logprobs]}
                            for t in logprobs], "refusal": None}

    def completion_logprobs(logprobs: list | None, offset: int = 0):
        """The completions API's {tokens, token_logprobs, top_logprobs, text_offset}."""
        if logprobs is None:
            return None
        tokens = [token_text(t.token_id) for t in logprobs]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in logprobs],
                "top_logprobs": [{token_text(i): lp for i, lp in t.top_logprobs} for t in logprobs],
                "text_offset": offsets}

    async def whole_response(generations: Generations, event: Event, completion_id: str, *, chat: bool,
                             errors: dict):
        results: dict = {}
        while event is not None:
            _raise_failure(event, errors)
            if event.text is None:
                results[event.index] = event.end
            event = await generations.next()
        choices = []
        # GenerationResult.logprobs and Request.events come with the engine's logprobs support
        for index in range(len(results)):
            result = results[index]
            choice = {"index": index, "finish_reason": result.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
                choice["logprobs"] = chat_logprobs(getattr(result, "logprobs", None))
            else:
                choice["text"] = result.text
                choice["logprobs"] = completion_logprobs(getattr(result, "logprobs", None))
            choices.append(choice)
        return {"id": completion_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": server.model_name, "choices": choices,
                "usage": usage(results, generations.choices_per_prompt)}

    async def stream_chunks(generations: Generations, event: Event, completion_id: str, *, chat: bool,
                            include_usage: bool, errors: dict):
        base = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": server.model_name}
        if include_usage:
            base["usage"] = None
        text_offsets = [0] * len(generations.requests)

        def chunk(index: int, text: str | None, logprobs, finish_reason: str | None = None) -> bytes:
            if chat:
                choice = {"index": index, "delta": {} if text is None else {"content": text},
                          "logprobs": chat_logprobs(logprobs), "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text or "",
                          "logprobs": completion_logprobs(logprobs, text_offsets[index]),
                          "finish_reason": finish_reason}
                text_offsets[index] += len(text or "")
            return sse({**base, "choices": [choice]})

        if chat:
            for index in range(len(generations.requests)):
                yield sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        results = {}
        while event is not None:
            if event.text is not None:
                yield chunk(event.index, event.text, event.logprobs)
            elif isinstance(event.end, BaseException):
                error = engine_error(event.end, admitted=True, **errors)
                yield sse({"error": {"message": error.message, "type": error.type, "param": error.param,
                                     "code": error.code}})
                generations.cancel()
                return
            else:
                results[event.index] = event.end
                yield chunk(event.index, None, None, event.end.finish_reason)
            event = await generations.next()
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(results, generations.choices_per_prompt)})
        yield sse(b"[DONE]")

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(request: HttpRequest):
        body = await read_json_body(request, server.max_body_bytes)
        server.check_model(body)
        if not server.embedding:
            raise ApiError(400, f"{server.model_name!r} generates text and has no embeddings; serve an embedding "
                                f"model (a sentence-transformers or BERT directory)", param="model",
                           code="model_not_supported")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _bad_value("input", "input must be a string or a non-empty list of strings (kiln embeds text, "
                                      "not token ids)")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise _bad_value("input", f"input holds {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} are allowed")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _bad_value("encoding_format", f"encoding_format must be float or base64, got {encoding!r}")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != engine.hidden_size:
            raise _not_supported("dimensions", f"the model's vectors have {engine.hidden_size} dimensions and kiln "
                                               f"does not shorten them")
        server.admit(1)
        try:
            async with server.embed_lock:
                vectors, tokens = await asyncio.to_thread(_embed, engine, texts)
        except KilnError as err:
            raise engine_error(err, max_tokens_field="max_tokens", prompt_field="input") from None
        finally:
            server.release()
        server.metrics.prompt_tokens.inc(tokens)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": server.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


def _embed(engine, texts: list) -> tuple[np.ndarray, int]:
    vectors = engine.embed(texts)
    tokens = sum(min(len(engine.tokenizer.encode(t)), engine.max_seq_len) for t in texts)
    return vectors, tokens


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) before the model loads, so a busy port fails at once in one line and
    port 0's choice is known before serving."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def serve(engine, sock: socket.socket, *, model_name: str, api_key: str | None = None,
          max_queued: int = DEFAULT_MAX_QUEUED, drain_timeout: float = 30.0) -> None:
    """Serve on ``sock`` (from :func:`listening_socket`) until Ctrl-C or SIGTERM: uvicorn drains running
    requests for up to ``drain_timeout`` seconds, cancels the rest, and re-raises the signal after."""
    app = create_app(engine, model_name=model_name, api_key=api_key, max_queued=max_queued)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"kiln: serving {model_name} on http://{shown}:{port}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
