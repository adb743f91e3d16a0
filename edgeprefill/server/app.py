"""The HTTP side of `edgeprefill serve`: a Starlette app speaking OpenAI's API over the engine,
and `serve`, which binds the socket and runs it under uvicorn.

Starlette and uvicorn come with the `server` extra (pip install 'edgeprefill[server]').
"""

import asyncio
import hmac
import json
import socket

from edgeprefill.errors import EdgeprefillError
from edgeprefill.server import protocol
from edgeprefill.server.engine import QueueFull
from edgeprefill.server.protocol import ApiError

POLL_S = 0.25  # how often a waiting request checks that its client is still there


def _require():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgeprefillError("the server needs Starlette and uvicorn: pip install "
                               "'edgeprefill[server]' (make serve installs them)") from None


def create_app(engine, model_id, defaults=None, api_key=None):
    """The ASGI app. `defaults`: a protocol.Defaults (the server's flags); `api_key`: when
    set, every request must carry `Authorization: Bearer <api_key>`."""
    _require()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    defaults = defaults or protocol.Defaults()
    lm = engine.lm

    def error(e):
        return JSONResponse(e.body(), status_code=e.status)

    def authorized(request):
        if api_key is None:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode())

    async def body_of(request):
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    async def next_event(events, request, job):
        """The job's next event; None (and the job cancelled) if the client went away."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return None

    async def generate(request, chat):
        try:
            body = await body_of(request)
            if chat:
                req = protocol.parse_chat(body, lm.tokenizer, defaults, engine.window)
            else:
                req = protocol.parse_completion(body, lm.tokenizer, defaults, engine.window,
                                                lm.model.vocab_size)
        except ApiError as e:
            return error(e)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()

        def emit(event):  # from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutting down)
                pass

        try:
            job = engine.submit(req, emit)
        except QueueFull as e:
            return error(ApiError(503, str(e), code="queue_full"))
        first = await next_event(events, request, job)
        if first is None:
            return JSONResponse({}, status_code=499)  # nobody is listening
        if first[0] == "error":
            return error(ApiError(first[1], first[2]))
        if req.stream:
            return StreamingResponse(_sse(req, first, events, request, job),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, event = "", first
        while event[0] == "text":
            text += event[1]
            event = await next_event(events, request, job)
            if event is None:
                return JSONResponse({}, status_code=499)
        if event[0] == "error":
            return error(ApiError(event[1], event[2]))
        return JSONResponse(protocol.response(req, model_id, text, event[1]))

    async def _sse(req, first, events, request, job):
        def data(obj):
            return f"data: {json.dumps(obj)}\n\n"

        event = first
        try:
            if req.chat:
                yield data(protocol.chunk(req, model_id, role=True))
            while event is not None:
                if event[0] == "text":
                    yield data(protocol.chunk(req, model_id, text=event[1]))
                elif event[0] == "done":
                    summary = event[1]
                    finish = protocol.FINISH.get(summary["finish_reason"], "stop")
                    yield data(protocol.chunk(req, model_id, finish=finish, summary=summary))
                    if req.include_usage:
                        yield data(protocol.chunk(req, model_id, summary=summary,
                                                  usage_only=True))
                    yield "data: [DONE]\n\n"
                    return
                else:  # an error after the stream began: OpenAI's in-stream error shape
                    yield data(ApiError(event[1], event[2]).body())
                    return
                event = await next_event(events, request, job)
        finally:
            job.cancel()  # the client left (or we are done): the engine stops at its next token

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def completions(request):
        return await generate(request, chat=False)

    def guarded(handler):
        async def run(request):
            if not authorized(request):
                return error(ApiError(401, "missing or wrong API key: send 'Authorization: "
                                      "Bearer <key>' with the server's --api-key",
                                      code="invalid_api_key"))
            return await handler(request)
        return run

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "edgeprefill"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id})

    async def metrics(request):
        return JSONResponse({"model": model_id, **engine.status(),
                             "strategies": engine.metrics.snapshot()})

    async def http_error(request, exc):
        message = {404: f"no route {request.url.path}: the API is under /v1 (chat/completions, "
                        "completions, models), with /health and /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
                       exc.status_code, str(exc.detail))
        return error(ApiError(exc.status_code, message))

    routes = [Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
              Route("/v1/completions", guarded(completions), methods=["POST"]),
              Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/health", guarded(health), methods=["GET"]),
              Route("/metrics", guarded(metrics), methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def bind(host, port):
    """A listening socket on host:port (port 0: any free one), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EdgeprefillError(f"cannot listen on {host}:{port} ({e.strerror}): pick another "
                               "--port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(app, sock, log_level="info"):
    """Run `app` on the bound socket until Ctrl-C / SIGTERM (open streams get 5 s)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
