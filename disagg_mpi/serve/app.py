"""The OpenAI-compatible HTTP server on rank 0 (aiohttp, one asyncio loop).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /v1/models, GET /health,
GET /metrics. Errors are OpenAI-shaped: {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from ..api import Response
from ..hops import stamp_http_body
from ..orchestrator.admission import ModelLimits, model_limits
from ..runtime.last_words import Teller
from ..runtime.signals import STOP_SIGNALS
from ..stops import ChoiceOutput
from .best_of import best_candidates, without_logprobs
from .dispatcher import SHUT_DOWN, Dispatcher
from .last_words import LastWords
from .metrics import ServerMetrics
from .outputs import collect
from .protocol import (
    CONTEXT_ONLY,
    ApiError,
    ParsedRequest,
    check_benchmark_allowed,
    check_limits,
    error_body,
    http_param,
    parse_chat,
    parse_completion,
    parse_json_body,
)
from .responses import choice_logprobs, full_body, prompt_only
from .streaming import HTTP_IN, stream_choices

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
        self.limits = _limits(topo)
        self.vocab = self.limits.vocab_size if self.limits else None
        kinds = {ex: ("context" if topo.is_context(ex) else "generation") for ex in range(len(topo.executors))}
        self.metrics = ServerMetrics(kinds)
        self.dispatcher = Dispatcher(orch)
        self.shutting_down = False
        self.started = int(time.time())
        self.last_words = LastWords(None)  # serve_async connects it to the launcher, where there is one


def _limits(topo: Any) -> ModelLimits | None:
    try:
        return model_limits(str(topo.model.path))
    except Exception:  # noqa: BLE001 - the orchestrator checks again (and fails loudly) on submit
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
    request[HTTP_IN] = time.time()  # the request's first hop (hops.py)
    try:
        raw = await request.read()
        p = parse(parse_json_body(raw), state.tok, state.model_names, state.vocab)
        check_benchmark_allowed(p, state.topo.server.allow_benchmark_requests)
        check_limits(p, state.limits)
    except (ApiError, web.HTTPException) as err:
        state.metrics.outcome("refused" if err.status < 500 else "error")
        raise
    subs: list[tuple[int, asyncio.Queue]] = []
    try:
        for r in p.requests:  # one engine request per choice
            if r.stop_words and p.mode != CONTEXT_ONLY:
                r.streaming = True  # rank 0 must see each token to cancel at a stop string (outputs.py)
            subs.append(state.dispatcher.submit(r, p.mode))
    except (ValueError, KeyError) as err:
        for gid, _ in subs:
            state.dispatcher.cancel(gid)
        state.metrics.outcome("refused")
        raise ApiError(400, str(err), http_param(getattr(err, "param", None), p.kind), "request_refused") from None
    state.metrics.in_flight.set(state.dispatcher.in_flight)
    request["last_words"] = state.last_words.hold(request)  # if the job dies now, the launcher answers

    def cancel_all() -> None:
        for gid, _ in subs:
            state.dispatcher.cancel(gid)

    try:
        if p.stream:
            return await stream_choices(request, state, p, subs, _engine_error)
        outs = [ChoiceOutput(state.tok, r) for r in p.requests]
        finals = await asyncio.gather(*(collect(o, q, functools.partial(state.dispatcher.cancel, gid))
                                        for o, (gid, q) in zip(outs, subs)))
        return _finish_full(state, p, finals, outs, request.get(HTTP_IN))
    except asyncio.CancelledError:  # the client went away
        cancel_all()
        state.metrics.outcome("cancelled")
        raise
    except Exception:
        cancel_all()
        raise
    finally:
        state.last_words.drop(request["last_words"])
        state.metrics.in_flight.set(state.dispatcher.in_flight)


def _engine_error(state: ServerState, p: ParsedRequest, resp: Response) -> web.Response:
    msg = resp.error_msg or "unknown error"
    if msg == SHUT_DOWN:
        return _shut_down(state)
    if msg.startswith("internal error") or "shutting down" in msg:
        state.metrics.outcome("error")
        return _err(500, msg, "server_error")
    if resp.retry_after is not None:  # held contexts fill their share of the pool (engine/hold_cap.py)
        state.metrics.outcome("refused")
        state.metrics.held_full.inc()
        out = _err(429, msg, "rate_limit_error", code="held_contexts_full")
        out.headers["Retry-After"] = str(max(1, math.ceil(resp.retry_after)))
        return out
    state.metrics.outcome("refused")  # the client's request, not the server, was at fault
    return _err(400, msg, param=http_param(resp.error_param, p.kind), code="request_refused")


def _shut_down(state: ServerState) -> web.Response:
    """A non-streamed request the drain could not finish (the job is going down): 503."""
    state.metrics.outcome("error")
    return _err(503, f"{SHUT_DOWN}: the job is stopping and the request did not finish within the "
                "grace period; send it again to another server", "server_error", code="shutting_down")


def _finish_full(state: ServerState, p: ParsedRequest, finals: list[Response], outs: list[ChoiceOutput],
                 http_in: float | None = None) -> web.Response:
    failed = next((r for r in finals if r.has_error() or r.result is None), None)
    if failed is not None:
        return _engine_error(state, p, failed)
    if state.shutting_down and any(r.result.finish_reason == "cancelled" for r in finals):
        return _shut_down(state)  # cut by the drain's deadline: a 5xx, not a 200 with part of the text
    for r, req in zip(finals, p.requests):
        if r.result.finish_reason == "cancelled":
            state.metrics.outcome("cancelled")
        else:
            state.metrics.outcome("ok")
            state.metrics.finished(r.result.metrics, len(req.input_token_ids), len(r.result.output_token_ids))
    for r in finals:
        stamp_http_body(r.result.metrics, http_in)
    billed = None
    if p.best_of > p.n:  # the n best candidates of each prompt (best_of.py)
        keep, billed = best_candidates(finals, p.best_of, p.n)
        finals = [finals[i] if p.show_logprobs else without_logprobs(finals[i]) for i in keep]
        outs = [outs[i] for i in keep]
        p = dataclasses.replace(p, requests=[p.requests[i] for i in keep], best_of=1,
                                echo=[p.echo[i] for i in keep] if p.echo else [])
    if p.score_only:  # max_tokens 0 with echo: the prompt alone
        finals = [prompt_only(r) for r in finals]
    lps = [choice_logprobs(p.kind, state.tok, req, r.result, o.tracker.pieces, o.prompt_logprobs,
                           len(p.echo[i]) if i < len(p.echo) else 0)
           for i, (r, o, req) in enumerate(zip(finals, outs, p.requests))]
    return _json(full_body(p, [(r, "" if p.score_only else o.text) for r, o in zip(finals, outs)], lps, billed))


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
    return _json({"status": "ok", "executors": devices, "in_flight": state.dispatcher.in_flight,
                  "tracked": state.orch.num_tracked})


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
    state.last_words = LastWords(Teller.connect())
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
            state.dispatcher.fail_all()
        await asyncio.sleep(0.05)  # let handlers write their last bytes
        await state.dispatcher.stop()
        await runner.cleanup()
        for sig in STOP_SIGNALS:
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
