"""Stop strings, found on rank 0 where the tokens become text.

The executors never see stop strings: rank 0 detokenizes each request's tokens
as they arrive, finds the first stop string and cancels the request. Context
and generation executors take no part in it, so a stop ends the aggregated
and the disaggregated run of a request at the same token by construction.

`StopMatcher` is pure text (fed in pieces, it holds back any tail that may
still become a stop string, so no part of a stop string is ever emitted);
`StopTracker` feeds it one token at a time and remembers which token ended
the text; `ChoiceOutput` follows one request's responses with it, and
`follow_stops` wires that into `orchestrator.generate` (as `disagg-mpi run` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .api import Request, RequestMetrics, Response, Result, TokenLogprobs

MAX_STOP_STRINGS = 4  # OpenAI's limit


def check_stop_strings(value: Any, field: str = "stop") -> list[str]:
    """A `stop` value (None, a string or a list of up to 4 strings) as a list; ValueError naming `field`."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"{field}={value!r} must be a string or a list of up to {MAX_STOP_STRINGS} strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"{field} has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
    if any(s == "" for s in stops):
        raise ValueError(f"{field}={value!r} holds an empty string; every stop string needs a character")
    return list(stops)


class StopMatcher:
    """Text in, text that is safe to emit out; `stopped` once a stop string appeared.

    On a stop the output ends just before it (or just after it with `include`);
    what follows is dropped. Where several stop strings appear the earliest one
    wins (on a tie, the one that ends first: it was complete first).
    """

    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops = [s for s in stops if s]
        self.include = include
        self.held = ""  # a tail that may be the start of a stop string
        self.stopped = False
        self.stop_string: str | None = None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self.held + text
        hit = self._first_match(buf)
        if hit is not None:
            start, stop = hit
            self.stopped, self.stop_string, self.held = True, stop, ""
            return buf[: start + len(stop)] if self.include else buf[:start]
        keep = self._partial_tail(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The end of the text without a stop: what was held back is plain text after all."""
        out, self.held = self.held, ""
        return out

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        best = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
                best = (i, s)
        return best

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest


class StopTracker:
    """Token ids in, emit-safe text out, for one request.

    `tokenizer` needs `decode(ids)`. With no stop strings it is an incremental
    detokenizer (a trailing partial UTF-8 character is held back). `num_tokens`
    counts the tokens taken: after a stop, the token that completed the stop
    string is the last one counted and later ones are ignored.

    Detokenization is incremental the way vLLM's is: each token decodes a short
    window (the tokens since the last emitted text, after a few of context, so
    tokenizers that drop a leading space at the start of a decode still get it
    right), never the whole output again, so a long output costs O(n).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), include: bool = False):
        self.tok = tokenizer
        self.matcher = StopMatcher(stops, include)
        self.ids: list[int] = []
        # The text each token added to the output, before stop strings ("" while it ends in half a
        # character: the token completing it gets the whole character): logprobs' token strings.
        self.pieces: list[str] = []
        self.prefix_offset = 0  # the window's context starts here ...
        self.read_offset = 0  # ... and its text up to here was already passed on

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def _delta(self) -> str | None:
        """New text of the tokens after read_offset; None while it ends in half a character."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tok.decode(self.ids[self.prefix_offset:])
        if text.endswith("\ufffd"):
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def add(self, tokens: Sequence[int]) -> str:
        out = []
        for t in tokens:  # one at a time: the stop must be pinned to the token that completed it
            if self.stopped:
                break
            self.ids.append(int(t))
            delta = self._delta()
            self.pieces.append(delta or "")
            if delta:
                out.append(self.matcher.feed(delta))
        return "".join(out)

    def finish(self) -> str:
        """At the end of the request: whatever was held back (nothing after a stop)."""
        if self.stopped:
            return ""
        rest = ""
        if self.read_offset < len(self.ids):  # it ended in half a character: decode it as it is
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
            rest = self.matcher.feed(self.tok.decode(self.ids[self.prefix_offset:])[len(prefix):])
            self.prefix_offset = self.read_offset = len(self.ids)
        return rest + ("" if self.stopped else self.matcher.flush())


class Taken(NamedTuple):
    """What one response adds to a choice, stop strings applied."""

    text: str
    tokens: list[int]
    logprobs: list[TokenLogprobs] | None  # of `tokens`, where the request asked
    pieces: list[str]  # the text of each of `tokens` (StopTracker.pieces)


class ChoiceOutput:
    """Feeds one request's responses through a `StopTracker`; keeps the text sent so far."""

    def __init__(self, tokenizer: Any, request: Request):
        self.tracker = StopTracker(tokenizer, request.stop_words, request.include_stop_str_in_output)
        self.seen = 0  # tokens received in non-final responses (a final one holds every token)
        self.text = ""
        # the kept tokens' logprobs (those past a stop string are dropped with their tokens), if asked
        self.logprobs: list[TokenLogprobs] | None = None
        # the prompt's (Request.num_prompt_logprobs), from the first response that brings them
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def stopped(self) -> bool:
        return self.tracker.stopped

    @property
    def tokens(self) -> list[int]:
        """Output tokens up to the one that completed a stop string (all of them otherwise)."""
        return list(self.tracker.ids)

    def take(self, resp: Response) -> Taken:
        """The new text, tokens, logprobs and token texts of `resp`, stop strings applied."""
        tokens = list(resp.result.output_token_ids) if resp.result is not None else []
        lps = resp.result.log_probs if resp.result is not None else None
        if self.prompt_logprobs is None and resp.result is not None:
            self.prompt_logprobs = resp.result.prompt_log_probs
        start = self.seen if resp.is_final else 0
        new = tokens[start:]
        if not resp.is_final:
            self.seen += len(tokens)
        before = self.tracker.num_tokens
        text = self.tracker.add(new)
        used = new[: self.tracker.num_tokens - before]
        if resp.is_final:
            text += self.tracker.finish()
        self.text += text
        new_lps = None
        if lps is not None:
            new_lps = list(lps[start:start + len(used)])
            self.logprobs = (self.logprobs or []) + new_lps
        return Taken(text, used, new_lps, self.tracker.pieces[before:before + len(used)])

    def final_response(self, resp: Response) -> Response:
        """`resp` (final) with the tokens and finish reason the client sees."""
        if not self.stopped:
            return resp
        r = resp.result
        return Response(resp.request_id, Result(self.tokens, True, "stop",
                                                r.context_phase_params if r else None, r.metrics if r else RequestMetrics(),
                                                self.logprobs if r and r.log_probs is not None else None),
                        None, resp.client_id)


def follow_stops(tokenizer: Any, requests: Sequence[Request], cancel: Callable[[int], None]
                 ) -> tuple[dict[str, ChoiceOutput], Callable[[int, Response], None]]:
    """Stop strings for `orchestrator.generate(requests, on_response=...)` (what `disagg-mpi run` does).

    Each request with `stop_words` is set to stream from its executor and gets a `ChoiceOutput`,
    keyed by its `client_id` (which must be unique among them); the returned callback feeds it
    the responses and calls `cancel(global id)` at the first stop string. Afterwards
    `outputs[client_id].final_response(final)` and `.text` are what the client should see.
    """
    outputs: dict[str, ChoiceOutput] = {}
    for req in requests:
        if req.stop_words:
            if req.client_id is None or req.client_id in outputs:
                raise ValueError(f"requests with stop_words need unique client ids, got {req.client_id!r}")
            req.streaming = True
            outputs[req.client_id] = ChoiceOutput(tokenizer, req)

    def on_response(gid: int, resp: Response) -> None:
        out = outputs.get(resp.client_id) if resp.client_id is not None else None
        if out is None or out.stopped or resp.has_error():
            return
        out.take(resp)
        if out.stopped and not resp.is_final:
            cancel(gid)

    return outputs, on_response
