"""The load generator: streams `POST /v1/completions` requests with aiohttp and times every chunk."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from .metrics import RequestRecord
from .workload import BenchRequest, arrival_offsets


def completion_payload(req: BenchRequest, temperature: float = 0.0, stream: bool = True,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": req.prompt_text if req.prompt_text is not None else list(req.prompt_ids),
        "max_tokens": int(req.output_len),
        "temperature": temperature,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if extra:
        body.update(extra)
    return body


async def takes_token_ids(base_url: str, headers: dict[str, str] | None = None, timeout: float = 60.0) -> bool:
    """Whether the server at `base_url` takes a prompt of token ids (OpenAI's API allows it;
    llama.cpp's server answers 500, some others 400/422): one 1-token completion tells."""
    url = base_url.rstrip("/") + "/v1/completions"
    body = {"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0.0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        try:
            async with session.post(url, json=body, headers=headers or {}) as resp:
                await resp.read()
                return resp.status == 200
        except aiohttp.ClientError:
            return False


def parse_sse_line(line: bytes | str) -> Any:
    """One SSE line -> the decoded JSON object, the string '[DONE]', or None (not a data line)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return "[DONE]"
    if not data:
        return None
    return json.loads(data)


def chunk_tokens(obj: dict[str, Any]) -> int:
    """How many output tokens a stream chunk carries (0 for a chunk with none, e.g. a usage-only one).

    A chunk with `token_ids` counts them; otherwise a choice with non-empty text,
    or with empty text but no finish_reason yet (a token that decodes to no
    text so far), counts as one token.
    """
    n = 0
    for ch in obj.get("choices") or []:
        ids = ch.get("token_ids")
        if isinstance(ids, list):
            n += len(ids)
        elif ch.get("text") or "text" in ch and ch.get("finish_reason") is None:
            n += 1
    return n


def _server_metrics(obj: dict[str, Any]) -> dict[str, Any]:
    m = obj.get("metrics")
    if isinstance(m, dict):
        return m
    for ch in obj.get("choices") or []:
        if isinstance(ch.get("metrics"), dict):
            return ch["metrics"]
    return {}


def output_count(usage_tokens: int | None, counted: int, finish_reason: str | None, max_tokens: int) -> int:
    """The tokens a stream produced: the server's usage if it sent one; else max_tokens if it stopped at
    "length" (a server may put several tokens in one chunk: llama-cpp-python holds back a token that
    ends in part of a UTF-8 character); else the chunks counted."""
    if usage_tokens is not None:
        return usage_tokens
    if finish_reason == "length":
        return max(counted, max_tokens)
    return counted


async def send_one(session: aiohttp.ClientSession, url: str, req: BenchRequest, temperature: float = 0.0,
                   extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> RequestRecord:
    """Send one streaming completion; returns what the client saw (never raises for request failures)."""
    rec = RequestRecord(idx=req.idx, input_len=req.input_len, output_len_requested=req.output_len)
    payload = completion_payload(req, temperature, True, extra)
    counted, usage_tokens, done, finish_reason = 0, None, False, None
    rec.start = time.perf_counter()
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                rec.error = f"HTTP {resp.status}: {body}"
                rec.end = time.perf_counter()
                return rec
            buf = b""
            async for piece in resp.content.iter_any():
                now = time.perf_counter()
                buf += piece
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        obj = parse_sse_line(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"bad SSE data line {line[:200]!r}: {err}") from None
                    if obj is None:
                        continue
                    if obj == "[DONE]":
                        done = True
                        continue
                    if isinstance(obj, dict) and obj.get("error"):
                        err = obj["error"]
                        raise ValueError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                    n = chunk_tokens(obj)
                    if n:
                        counted += n
                        rec.chunk_times.append(now)
                    usage = obj.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    sm = _server_metrics(obj)
                    if sm:
                        rec.server_metrics = sm
                    finish = [c.get("finish_reason") for c in obj.get("choices") or [] if c.get("finish_reason")]
                    if finish and finish[0] not in ("length", "stop"):
                        raise ValueError(f"finish_reason {finish[0]!r}")
                    finish_reason = finish[0] if finish else finish_reason
        rec.end = time.perf_counter()
        if not done:
            raise ValueError("the stream ended without data: [DONE]")
        if not rec.chunk_times:
            raise ValueError("the stream carried no output tokens")
        rec.output_tokens = output_count(usage_tokens, counted, finish_reason, req.output_len)
        rec.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError) as err:
        rec.end = time.perf_counter()
        rec.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return rec


async def run_load(base_url: str, requests: Sequence[BenchRequest], request_rate: float = math.inf,
                   concurrency: int | None = None, seed: int = 0, temperature: float = 0.0,
                   request_timeout: float = 600.0, extra: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None,
                   on_done: Callable[[RequestRecord], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Send `requests` with Poisson arrivals at `request_rate` (inf: at once), at most `concurrency` in flight.

    Returns the records in request order and the wall time (first send -> last completion).
    """
    url = base_url.rstrip("/") + "/v1/completions"
    offsets = arrival_offsets(len(requests), request_rate, seed)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()

        async def one(req: BenchRequest, off: float) -> RequestRecord:
            delay = t0 + off - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                rec = await send_one(session, url, req, temperature, extra, headers)
            else:
                async with sem:
                    rec = await send_one(session, url, req, temperature, extra, headers)
            if on_done is not None:
                on_done(rec)
            return rec

        records = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
    starts = [r.start for r in records]
    ends = [r.end for r in records]
    duration = (max(ends) - min(starts)) if records else 0.0
    return list(records), duration


async def get_json(base_url: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
                s.get(base_url.rstrip("/") + path) as resp):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text
