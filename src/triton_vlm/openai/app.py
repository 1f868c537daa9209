"""The FastAPI application: ``/v1/models``, ``/v1/chat/completions``, health, and the OpenAPI description.

Build it with :func:`create_app`; ``gateway`` may be any object with :class:`~triton_vlm.openai.triton.
TritonGateway`'s methods (tests pass a fake).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triton_vlm._protocol.wire import TokenLogprob
from triton_vlm.errors import TritonVLMError
from triton_vlm.openai.config import OpenAIOptions
from triton_vlm.openai.errors import APIError, from_triton
from triton_vlm.openai.images import image_bytes
from triton_vlm.openai.messages import conversation
from triton_vlm.openai.playground import install_playground
from triton_vlm.openai.schemas import (
    Capability,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from triton_vlm.openai.triton import ChatInput, Piece, Sampling, ServedModel, TritonGateway

log = logging.getLogger("triton_vlm.openai")
T = TypeVar("T")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (bad field, no image, bad image, ...)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body or image too large"},
    429: {"model": ErrorResponse, "description": "Too many requests in flight; retry later"},
    500: {"model": ErrorResponse, "description": "The model failed while generating"},
    503: {"model": ErrorResponse, "description": "Triton or the model is unavailable; retry later"},
    504: {"model": ErrorResponse, "description": "Triton did not answer in time"},
}
STREAM_DESCRIPTION = ("With `stream: true`: server-sent events, each `data: <ChatCompletionChunk JSON>`, each "
                      "choice's last chunk with its finish_reason (n > 1: the choices' chunks interleaved, each "
                      "with its index), then (with stream_options.include_usage) a chunk with the usage and no "
                      "choices, then `data: [DONE]`.")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# -- request body limit -------------------------------------------------------------------------------------
class BodyLimit:
    """Reads each request body (up to ``limit`` bytes) before the app sees it; a larger one is a 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"request body is over this server's limit of {self.limit} bytes",
                             code="request_too_large")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await error_response(APIError(400, "invalid Content-Length header"))(scope, receive, send)
                return
            if size > self.limit:
                await error_response(too_large)(scope, receive, send)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                await error_response(too_large)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- the app ------------------------------------------------------------------------------------------------
def create_app(options: OpenAIOptions, gateway: Any = None) -> FastAPI:
    gateway = gateway if gateway is not None else TritonGateway(options.triton_grpc_url,
                                                                timeout_s=options.request_timeout_s)
    started = int(time.time())
    #: Requests in flight by the index of the API key that authorized them (None: no keys); their sum is the total.
    in_flight: Counter[int | None] = Counter()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await gateway.close()

    app = _App(
        title="triton-vlm OpenAI-compatible API",
        version="1",
        description="OpenAI chat completions with images, in front of Triton (llava, kosmos2, moondream2). "
                    "Conversations are rendered with each model's own chat template; images as data URIs, as many "
                    "as the model takes (none for a text-only chat). See docs/openai.md.",
        docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
    )

    # -- auth ---------------------------------------------------------------------------------------------
    keys = [key.encode("latin-1") for key in options.api_keys]
    bearer = HTTPBearer(auto_error=False, description="An API key given to the server (--api-key)")

    async def authorize(request: Request,
                        credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not keys:
            return
        if credentials is None:
            raise APIError(401, "You didn't provide an API key: send it in the Authorization header "
                                "(Authorization: Bearer YOUR_KEY).", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        presented = credentials.credentials.encode("latin-1", "replace")
        matched: int | None = None
        for index, key in enumerate(keys):  # every key is compared: the time taken tells nothing of which
            if hmac.compare_digest(presented, key):
                matched = index
        if matched is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        request.state.api_key = matched  # an index, never the key: per-key limits count by it

    guarded = [Depends(authorize)] if keys else []

    # -- errors -------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = {404: "Unknown URL: see /openapi.json for this server's endpoints",
                   405: "Method not allowed on this URL"}.get(status, str(exc.detail))
        return error_response(APIError(status, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return error_response(APIError(500, f"internal error ({type(exc).__name__})", code="internal_error"))

    # -- health and description ---------------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["health"], summary="Liveness (no API key needed)")
    async def health() -> Health:
        return Health(status="ok")

    @app.get("/health/ready", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "Triton is not ready"}},
             summary="Readiness: Triton answers and is ready (no API key needed)")
    async def health_ready() -> Any:
        if await gateway.ready():
            return Health(status="ok", triton=options.triton_grpc_url)
        return JSONResponse(Health(status="unavailable", triton=options.triton_grpc_url).model_dump(),
                            status_code=503)

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    # -- models -------------------------------------------------------------------------------------------
    async def served() -> dict[str, ServedModel]:
        try:
            return await gateway.models()
        except TritonVLMError as exc:
            raise from_triton(exc, "") from None

    async def find_model(name: str) -> ServedModel:
        models = await served()
        if name not in models:
            try:
                models = await gateway.models(refresh=True)
            except TritonVLMError as exc:
                raise from_triton(exc, name) from None
        if name not in models:
            served_names = ", ".join(models) or "none"
            raise APIError(404, f"The model '{name}' does not exist; this server has: {served_names}",
                           param="model", code="model_not_found")
        return models[name]

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded, tags=["models"],
             responses=_pick(ERROR_RESPONSES, 401, 500, 503), summary="The models served")
    async def list_models() -> ModelList:
        return ModelList(data=[card(model) for model in (await served()).values()])

    @app.get("/v1/models/{model}", response_model=ModelCard, dependencies=guarded, tags=["models"],
             responses=_pick(ERROR_RESPONSES, 401, 404, 500, 503), summary="One served model")
    async def get_model(model: str) -> ModelCard:
        return card(await find_model(model))

    def card(model: ServedModel) -> ModelCard:
        flags: tuple[tuple[Capability, bool], ...] = (
            ("stream", model.streams), ("task", model.tasks), ("entities", model.entities))
        capabilities = [name for name, has in flags if has]
        return ModelCard(id=model.name, created=started, capabilities=capabilities)

    # -- chat completions ---------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=guarded, tags=["chat"], response_model=ChatCompletion,
              responses={200: {"description": "The answer; with `stream: true`, server-sent events instead.",
                               "content": {"text/event-stream": {"schema": {"type": "string",
                                                                            "description": STREAM_DESCRIPTION}}}},
                         **ERROR_RESPONSES},
              summary="Answer a conversation about images (or text alone)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if in_flight.total() >= options.max_concurrent_requests:
            raise APIError(429, f"too many requests in flight (limit {options.max_concurrent_requests}); retry "
                                f"shortly", code="rate_limit_exceeded")
        key = getattr(request.state, "api_key", None)
        per_key_limit = options.max_concurrent_per_key if key is not None else 0
        if per_key_limit and in_flight[key] >= per_key_limit:
            raise APIError(429, f"too many requests in flight for this API key (limit {per_key_limit}); retry "
                                f"shortly", code="rate_limit_exceeded")
        in_flight[key] += 1
        handed_over = False

        def release() -> None:
            in_flight[key] -= 1

        try:
            refuse_unsupported(body)
            model = await find_model(body.model)
            chat = conversation(body.messages)
            _check_text(chat.messages, "messages")
            if body.task is not None:
                _check_text(body.task, "task")
                if not model.tasks:  # else Triton itself refuses the unknown input, and the caller sees a 500
                    raise APIError(400, f"model {model.name!r} takes no task (the task extension is for models "
                                        f"with several skills, such as moondream2)", param="task",
                                   code="unsupported_parameter")
            images = [await image_bytes(ref.url, param=ref.param, max_bytes=options.max_image_bytes,
                                        allow_remote=options.allow_remote_images,
                                        allow_private=options.allow_private_image_hosts,
                                        timeout_s=options.remote_image_timeout_s) for ref in chat.images]
            inputs = ChatInput(chat.messages, tuple(images))
            sampling = sampling_of(body)
            limit_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            if not body.stream:
                try:
                    answer = await unless_disconnected(
                        request, gateway.infer(model.name, inputs, sampling, entities=model.entities))
                except ClientDisconnected:
                    # Nobody is left to read an answer; the gRPC call was cancelled, so Triton stops the work.
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                except TritonVLMError as exc:
                    raise from_triton(exc, model.name, max_tokens_param=limit_field) from None
                answer_body = completion(completion_id, created, model.name, answer, bool(body.logprobs))
                # The entities extension only where the model has it: other answers stay plain OpenAI.
                hidden = None if answer.entities is not None else {"choices": {"__all__": {"message": {"entities"}}}}
                return JSONResponse(answer_body.model_dump(mode="json", exclude=hidden))

            if model.streams:
                pieces = gateway.stream(model.name, inputs, sampling, entities=model.entities)
            else:  # no stream model: one whole answer
                pieces = _one(gateway.infer(model.name, inputs, sampling, entities=model.entities))
            try:  # the first piece before the 200: an error up to here still gets its own status
                first = await pieces.__anext__()
            except TritonVLMError as exc:
                await pieces.aclose()
                raise from_triton(exc, model.name, max_tokens_param=limit_field) from None
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(completion_id, created, model.name, first, pieces, include_usage, release,
                                bool(body.logprobs), body.n or 1)
            handed_over = True
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finally:
            if not handed_over:
                release()

    if options.playground:
        install_playground(app, options)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    if options.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False, max_age=600)
    return app


# -- client disconnects ------------------------------------------------------------------------------------
#: Status logged for a request whose client left before its answer (nginx's convention; never sent to anyone).
CLIENT_CLOSED_REQUEST = 499
#: How often a whole-answer request checks that its client is still there.
DISCONNECT_POLL_S = 0.5


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` while the client stays connected; if it leaves first, cancel ``work`` (for a gRPC call,
    Triton then cancels the request and the backend stops generating) and raise :class:`ClientDisconnected`.
    Streams need none of this: their generator is closed when the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# -- pieces of the chat handler ---------------------------------------------------------------------------
def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """400 for known OpenAI parameters whose effect this server cannot give (rather than silently ignore)."""
    checks: list[tuple[str, bool, str]] = [
        ("top_logprobs", bool(body.top_logprobs) and not body.logprobs, "top_logprobs needs logprobs: true"),
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
        ("tools", bool(body.tools), "tools are not supported: these models call no tools"),
    ]
    for param, bad, message in checks:
        if bad:
            raise APIError(400, message, param=param, code="unsupported_parameter")


def sampling_of(body: ChatCompletionRequest) -> Sampling:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    temperature, top_p = body.temperature, body.top_p
    if top_p is not None and top_p == 0:  # OpenAI's top_p=0 keeps only the top token: greedy
        temperature, top_p = 0.0, None
    # response_format goes to the model as JSON; the model validates it (a bad one is a 400 naming it).
    fmt = body.response_format
    response_format = None if not fmt or fmt.get("type") == "text" else json.dumps(fmt)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=body.seed, task=body.task,
                    response_format=response_format, stop=stop, n=body.n, logprobs=body.logprobs or None,
                    top_logprobs=body.top_logprobs if body.logprobs else None,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    repetition_penalty=body.repetition_penalty)


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: the text is not valid Unicode (lone surrogate)", param=param,
                       code="invalid_value") from None


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def completion(completion_id: str, created: int, model: str, answer: Piece, logprobs: bool = False) -> ChatCompletion:
    first = {"index": 0, "message": {"role": "assistant", "content": answer.text, "entities": answer.entities},
             "finish_reason": _finish(answer.finish_reason),
             "logprobs": openai_logprobs(answer.logprobs) if logprobs else None}
    others = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
               "finish_reason": _finish(c.finish_reason), "logprobs": openai_logprobs(c.logprobs) if logprobs else None}
              for c in answer.choices]
    completion_tokens = answer.completion_tokens + sum(c.generated_tokens for c in answer.choices)
    return ChatCompletion.model_validate({
        "id": completion_id, "created": created, "model": model, "choices": [first, *others],
        "usage": _usage(answer.prompt_tokens, completion_tokens, answer.cached_tokens),
    })


def openai_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Triton's ``token_logprobs`` as OpenAI's ``choices[].logprobs`` (``token_id``: our extension)."""
    def entry(token_id: int, token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")), "token_id": token_id}

    return {"content": [{**entry(e.token_id, e.token, e.logprob),
                         "top_logprobs": [entry(t.token_id, t.token, t.logprob) for t in e.top]} for e in entries],
            "refusal": None}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage: the prompt counted once, the completion tokens of every choice, and the prompt tokens the
    prefix cache held (``prompt_tokens_details.cached_tokens``, as OpenAI and vLLM report them)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


async def _one(answer: Any) -> AsyncGenerator[Piece, None]:
    """A whole answer as a one-piece stream (models without a ``<model>_stream`` companion)."""
    yield await answer


async def sse_events(completion_id: str, created: int, model: str, first: Piece, rest: AsyncGenerator[Piece, None],
                     include_usage: bool, release: Callable[[], None], logprobs: bool = False,
                     n: int = 1) -> AsyncIterator[str]:
    """``data: {chunk}`` events: the role (of each of the ``n`` choices), the text as it comes, each choice's finish
    reason, the usage, ``[DONE]``. The pieces of ``n`` choices come interleaved, each with its index; the stream is
    done once every choice had its finish reason."""

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        chunk: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                 "model": model, "system_fingerprint": None, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta(content: dict[str, Any], finish: str | None = None,
              entries: Sequence[TokenLogprob] = (), index: int = 0) -> list[dict[str, Any]]:
        return [{"index": index, "delta": content,
                 "logprobs": openai_logprobs(entries) if logprobs and entries else None, "finish_reason": finish}]

    try:
        for index in range(n):
            yield event(delta({"role": "assistant", "content": ""}, index=index))
        piece = first
        ended = completion_tokens = cached_tokens = 0  # over the choices that ended
        while True:
            if piece.text or (logprobs and piece.logprobs):
                yield event(delta({"content": piece.text}, entries=piece.logprobs, index=piece.index))
            if piece.finish_reason:
                # The entities extension rides on a choice's last chunk: only its whole answer has them.
                yield event(delta({} if piece.entities is None else {"entities": piece.entities},
                                  _finish(piece.finish_reason), index=piece.index))
                for choice in piece.choices:  # a whole answer of n choices: each further one in one chunk
                    yield event(delta({"content": choice.text}, _finish(choice.finish_reason), choice.logprobs,
                                      choice.index))
                ended += 1 + len(piece.choices)
                completion_tokens += piece.completion_tokens + sum(c.generated_tokens for c in piece.choices)
                if piece.index == 0:
                    cached_tokens = piece.cached_tokens
                if ended >= n:
                    break
            try:
                piece = await rest.__anext__()
            except StopAsyncIteration:  # a whole answer (one piece) always has its finish reasons
                break
            except TritonVLMError as exc:
                yield f"data: {json.dumps(from_triton(exc, model).body())}\n\n"
                return
        if include_usage:
            yield event([], _usage(piece.prompt_tokens, completion_tokens, cached_tokens))
        yield "data: [DONE]\n\n"
    finally:
        release()
        await rest.aclose()


def validation_error(errors: Any) -> APIError:
    """A 400 naming the first invalid field (FastAPI would answer 422; OpenAI answers 400)."""
    errors = list(errors)
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ""
    for part in location:
        param += f"[{part}]" if part.isdigit() else (f".{part}" if param else part)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if kind == "missing" and not location:
        return APIError(400, "the request needs a JSON body", code="invalid_json")
    message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid request body")
    return APIError(400, message + (f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""),
                    param=param or None, code="invalid_value")


def _pick(responses: dict[int | str, dict[str, Any]], *codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: responses[code] for code in codes}


class _App(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """FastAPI's description, with 400 where FastAPI documents 422 (this API answers validation errors 400)."""
        if self.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=self.title, version=self.version, description=self.description,
                                 routes=self.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            # The streamed events' shape: not a JSON response of its own, so described beside the others.
            chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in chunk.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["ChatCompletionChunk"] = chunk
            self.openapi_schema = schema
        return self.openapi_schema
