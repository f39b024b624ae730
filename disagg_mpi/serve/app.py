"""The OpenAI-compatible HTTP server on rank 0 (aiohttp, one asyncio loop).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /v1/models, GET /health,
GET /metrics. Errors are OpenAI-shaped: {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from ..api import Response
from ..runtime.signals import STOP_SIGNALS
from .dispatcher import Dispatcher
from .metrics import ServerMetrics
from .outputs import ChoiceOutput, collect, final_of
from .protocol import CONTEXT_ONLY, ApiError, ParsedRequest, error_body, parse_chat, parse_completion, parse_json_body
from .responses import chunk, finish_reason, full_body, usage_chunk

log = logging.getLogger(__name__)

DEFAULT_GRACE = 10.0


class ServerState:
    def __init__(self, orch: Any, topo: Any, tokenizer: Any, api_key: str | None, max_body_bytes: int,
                 served_model_name: str | None = None):
        self.orch = orch
        self.topo = topo
        self.tok = tokenizer
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        name = served_model_name or topo.model.path
        self.model_names = tuple(dict.fromkeys([name, str(topo.model.path)]))
        self.vocab = _vocab(topo)
        kinds = {ex: ("context" if topo.is_context(ex) else "generation") for ex in range(len(topo.executors))}
        self.metrics = ServerMetrics(kinds)
        self.dispatcher = Dispatcher(orch)
        self.shutting_down = False
        self.started = int(time.time())


def _vocab(topo: Any) -> int | None:
    try:
        from ..model.loader import load_model_config

        return load_model_config(topo.model.path).vocab_size
    except Exception:  # noqa: BLE001 - the engine checks token ids anyway
        return None


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=json.dumps)


def _err(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
         code: str | None = None) -> web.Response:
    return _json(error_body(message, type_, param, code), status)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        if request.path.startswith("/v1/"):
            _check_auth(request, state)
            if state.shutting_down and request.method == "POST":
                raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error")
            if request.content_length is not None and request.content_length > state.max_body_bytes:
                raise ApiError(413, f"the request body ({request.content_length} bytes) is over the limit of "
                               f"{state.max_body_bytes} bytes (server.max_body_bytes)", None, "request_too_large")
        return await handler(request)
    except ApiError as err:
        return _json(err.body(), err.status)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        if err.status == 413:
            msg = f"the request body is over the limit of {state.max_body_bytes} bytes (server.max_body_bytes)"
        elif err.status == 404:
            msg = f"no route {request.method} {request.path}; see /v1/completions, /v1/chat/completions, " \
                  "/v1/models, /health, /metrics"
        elif err.status == 405:
            msg = f"method {request.method} is not allowed on {request.path}"
        else:
            msg = err.reason or str(err)
        return _err(err.status, msg, code=_HTTP_CODES.get(err.status))
    except Exception as err:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _err(500, f"internal server error: {type(err).__name__}: {err}", "server_error")


def _check_auth(request: web.Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("Authorization", "")
    if not header:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", None,
                       "invalid_api_key")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "incorrect API key provided", None, "invalid_api_key")


# ---- handlers --------------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat)


async def _generate(request: web.Request, parse: Any) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        raw = await request.read()
        p = parse(parse_json_body(raw), state.tok, state.model_names, state.vocab)
    except (ApiError, web.HTTPException):
        state.metrics.outcome("error")
        raise
    if p.request.stop_words and p.mode != CONTEXT_ONLY:
        p.request.streaming = True  # rank 0 must see each token to cancel at a stop string (outputs.py)
    try:
        gid, q = state.dispatcher.submit(p.request, p.mode)
    except (ValueError, KeyError) as err:
        state.metrics.outcome("error")
        raise ApiError(400, str(err), None, "request_refused") from None
    state.metrics.in_flight.set(state.dispatcher.in_flight)
    try:
        if p.stream:
            return await _stream(request, state, p, gid, q)
        out = ChoiceOutput(state.tok, p.request)
        resp = await collect(out, q, lambda: state.dispatcher.cancel(gid))
        return _finish_full(state, p, resp, out.text)
    except asyncio.CancelledError:  # the client went away
        state.dispatcher.cancel(gid)
        state.metrics.outcome("cancelled")
        raise
    except Exception:
        state.dispatcher.cancel(gid)
        raise
    finally:
        state.metrics.in_flight.set(state.dispatcher.in_flight)


def _engine_error(state: ServerState, resp: Response) -> web.Response:
    state.metrics.outcome("error")
    msg = resp.error_msg or "unknown error"
    if msg.startswith("internal error") or "shutting down" in msg:
        return _err(500, msg, "server_error")
    return _err(400, msg, code="request_refused")


def _finish_full(state: ServerState, p: ParsedRequest, resp: Response, text: str) -> web.Response:
    if resp.has_error() or resp.result is None:
        return _engine_error(state, resp)
    r = resp.result
    if r.finish_reason == "cancelled":
        state.metrics.outcome("cancelled")
    else:
        state.metrics.outcome("ok")
        state.metrics.finished(r.metrics, p.prompt_tokens, len(r.output_token_ids))
    return _json(full_body(p, resp, text))


def _public_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(request: web.Request, state: ServerState, p: ParsedRequest, gid: int,
                  q: asyncio.Queue) -> web.StreamResponse:
    resp = await q.get()
    if resp.has_error():  # refused before anything was sent: a plain error body
        return _engine_error(state, resp)
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})
    await out.prepare(request)
    text_out = ChoiceOutput(state.tok, p.request)
    first = True
    try:
        while True:
            if resp.has_error():
                state.metrics.outcome("error")
                await out.write(_sse(error_body(resp.error_msg or "unknown error", "server_error")))
                break
            text, new = text_out.take(resp)
            if text_out.stopped and not resp.is_final:
                state.dispatcher.cancel(gid)  # a stop string ended the text: nothing past it goes out
                resp = await final_of(q)
            if resp.is_final:
                resp = text_out.final_response(resp)
                reason = resp.result.finish_reason if resp.result else "error"
                last = chunk(p, text, new, finish_reason(reason), first)
                last["metrics"] = _public_metrics(resp.result.metrics if resp.result else {})  # extension
                await out.write(_sse(last))
                n_tokens = len(text_out.tokens)
                if reason == "cancelled":
                    state.metrics.outcome("cancelled")
                else:
                    state.metrics.outcome("ok")
                    state.metrics.finished(resp.result.metrics if resp.result else {}, p.prompt_tokens, n_tokens)
                if p.include_usage:
                    await out.write(_sse(usage_chunk(p, n_tokens)))
                break
            if new:
                await out.write(_sse(chunk(p, text, new, None, first)))
                first = False
            resp = await q.get()
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
    except (ConnectionResetError, ConnectionError) as err:
        log.info("request %d: client went away (%s); cancelling", gid, type(err).__name__)
        state.dispatcher.cancel(gid)
        state.metrics.outcome("cancelled")
    except Exception:
        log.exception("request %d: streaming failed", gid)
        state.dispatcher.cancel(gid)
        state.metrics.outcome("error")
        out.force_close()
    return out


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = [{"id": n, "object": "model", "created": state.started, "owned_by": "disagg-mpi",
             "root": str(state.topo.model.path)} for n in state.model_names[:1]]
    return _json({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.shutting_down:
        return _json({"status": "shutting_down"}, 503)
    devices = {str(k): v for k, v in sorted(state.orch.devices.items())}
    return _json({"status": "ok", "executors": devices, "in_flight": state.dispatcher.in_flight})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    m = state.metrics
    m.in_flight.set(state.dispatcher.in_flight)
    m.update_executors(dict(state.orch.load), dict(state.orch.free_blocks), state.orch.latest_executor_stats())
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=state.max_body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


# ---- running it ---------------------------------------------------------------------------------------


async def serve_async(orch: Any, topo: Any, host: str, port: int, api_key: str | None = None,
                      port_file: str | None = None, grace: float = DEFAULT_GRACE,
                      served_model_name: str | None = None, tokenizer: Any = None,
                      stop: asyncio.Event | None = None) -> None:
    """Serve until a stop signal (runtime/signals.py) or `stop` is set, then drain and return."""
    if tokenizer is None:
        from ..model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(topo.model.path)
    state = ServerState(orch, topo, tokenizer, api_key, topo.server.max_body_bytes, served_model_name)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    state.dispatcher.start()
    runner = web.AppRunner(build_app(state), handler_cancellation=True, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    real_host, real_port = (bound[0], bound[1]) if isinstance(bound, tuple) else (host, port)
    if port_file:
        tmp = Path(str(port_file) + ".tmp")
        tmp.write_text(str(real_port))
        tmp.replace(port_file)
    shown = f"[{real_host}]" if ":" in str(real_host) else real_host
    print(f"disagg-mpi serving on http://{shown}:{real_port}", flush=True)
    try:
        await stop.wait()
    finally:
        print("disagg-mpi: shutting down; draining in-flight requests", file=sys.stderr, flush=True)
        state.shutting_down = True
        deadline = time.monotonic() + grace
        while state.dispatcher.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if state.dispatcher.in_flight:
            log.warning("cancelling %d requests still running after %.1f s", state.dispatcher.in_flight, grace)
            state.dispatcher.cancel_all()
            deadline = time.monotonic() + 2.0
            while state.dispatcher.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            state.dispatcher.fail_all("the server shut down before the request finished")
        await asyncio.sleep(0.05)  # let handlers write their last bytes
        await state.dispatcher.stop()
        await runner.cleanup()
        for sig in STOP_SIGNALS:
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
