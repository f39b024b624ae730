"""Benchmark workloads: what to send and when. Pure functions, seeded.

A workload is a list of `BenchRequest`s (a prompt as token ids, the number of
output tokens to ask for) plus arrival offsets. Synthetic prompts are random
token ids, so input lengths are exact; dataset prompts (JSONL or ShareGPT)
are tokenized with the model's tokenizer and sent as ids for the same reason.
Every request asks for `ignore_eos`, so output lengths are exact too.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BenchRequest:
    prompt_ids: list[int]
    output_len: int
    idx: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    # Sent instead of the ids to servers that take text prompts only (llama.cpp's server); the
    # server tokenizes it again, so its prompt length is close to, not exactly, input_len.
    prompt_text: str | None = None

    @property
    def input_len(self) -> int:
        return len(self.prompt_ids)


# ---- length distributions -------------------------------------------------------

@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts: fixed:n | uniform:a:b | normal:mu:sigma |
    lognormal:mu:sigma (mu, sigma of the length itself) | exponential:mean."""

    kind: str
    params: tuple[float, ...]

    def sample(self, rng: random.Random, n: int, lo: int = 1, hi: int | None = None) -> list[int]:
        out = []
        for _ in range(n):
            if self.kind == "fixed":
                v = self.params[0]
            elif self.kind == "uniform":
                v = rng.randint(int(self.params[0]), int(self.params[1]))
            elif self.kind == "normal":
                v = rng.gauss(self.params[0], self.params[1])
            elif self.kind == "lognormal":
                mean, sd = self.params
                s2 = math.log(1 + (sd / mean) ** 2)
                v = rng.lognormvariate(math.log(mean) - s2 / 2, math.sqrt(s2))
            elif self.kind == "exponential":
                v = rng.expovariate(1.0 / self.params[0])
            else:  # pragma: no cover - parse_dist refuses other kinds
                raise ValueError(self.kind)
            v = max(lo, round(v))
            out.append(min(v, hi) if hi is not None else v)
        return out

    def __str__(self) -> str:
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])


_DIST_ARITY = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}


def parse_dist(spec: str | int) -> LengthDist:
    """'256' or 'fixed:256' | 'uniform:128:512' | 'normal:256:32' | 'lognormal:256:64' | 'exponential:256'."""
    if isinstance(spec, int):
        spec = str(spec)
    parts = spec.strip().split(":")
    if len(parts) == 1:
        parts = ["fixed", parts[0]]
    kind, raw = parts[0].lower(), parts[1:]
    if kind not in _DIST_ARITY:
        raise ValueError(f"length distribution {spec!r}: unknown kind {kind!r}; allowed: "
                         "N, fixed:N, uniform:A:B, normal:MU:SIGMA, lognormal:MEAN:SD, exponential:MEAN")
    if len(raw) != _DIST_ARITY[kind]:
        raise ValueError(f"length distribution {spec!r}: {kind} takes {_DIST_ARITY[kind]} number(s)")
    try:
        params = tuple(float(p) for p in raw)
    except ValueError:
        raise ValueError(f"length distribution {spec!r}: parameters must be numbers") from None
    if kind == "uniform" and not (1 <= params[0] <= params[1]):
        raise ValueError(f"length distribution {spec!r}: need 1 <= A <= B")
    if kind in ("fixed", "exponential") and params[0] < 1:
        raise ValueError(f"length distribution {spec!r}: the length must be >= 1")
    if kind in ("normal", "lognormal") and (params[0] < 1 or params[1] < 0):
        raise ValueError(f"length distribution {spec!r}: need MEAN >= 1 and SIGMA >= 0")
    return LengthDist(kind, params)


# ---- synthetic prompts ----------------------------------------------------------

def token_pool(vocab_size: int, special_ids: Sequence[int] = ()) -> tuple[int, int, frozenset[int]]:
    """The id range random prompts draw from: skips the low ids (specials, bytes) when the vocabulary allows."""
    lo = min(100, vocab_size // 4)
    return lo, vocab_size - 1, frozenset(int(s) for s in special_ids if s is not None)


def _random_ids(rng: random.Random, n: int, pool: tuple[int, int, frozenset[int]]) -> list[int]:
    lo, hi, banned = pool
    out = []
    while len(out) < n:
        t = rng.randint(lo, hi)
        if t not in banned:
            out.append(t)
    return out


def synthetic_requests(num_requests: int, input_len: LengthDist | str | int, output_len: LengthDist | str | int,
                       vocab_size: int, seed: int = 0, shared_prefix_ratio: float = 0.0,
                       special_ids: Sequence[int] = ()) -> list[BenchRequest]:
    """Random-id prompts of exact lengths.

    `shared_prefix_ratio` r in [0, 1]: the first round(r * input_len) tokens of
    every prompt come from one common sequence (the same for all requests), the
    rest are random per request.
    """
    if not 0.0 <= shared_prefix_ratio <= 1.0:
        raise ValueError(f"shared_prefix_ratio {shared_prefix_ratio} must be in [0, 1]")
    if vocab_size < 8:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    in_d = input_len if isinstance(input_len, LengthDist) else parse_dist(input_len)
    out_d = output_len if isinstance(output_len, LengthDist) else parse_dist(output_len)
    rng = random.Random(seed)
    pool = token_pool(vocab_size, special_ids)
    in_lens = in_d.sample(rng, num_requests)
    out_lens = out_d.sample(rng, num_requests)
    prefix_lens = [round(shared_prefix_ratio * n) for n in in_lens]
    common = _random_ids(rng, max(prefix_lens, default=0), pool)
    reqs = []
    for i, (n_in, n_out, n_pre) in enumerate(zip(in_lens, out_lens, prefix_lens)):
        ids = common[:n_pre] + _random_ids(rng, n_in - n_pre, pool)
        reqs.append(BenchRequest(ids, n_out, i, {"shared_prefix_len": n_pre}))
    return reqs


# ---- datasets -------------------------------------------------------------------

def _sharegpt_pairs(data: Any) -> list[tuple[str, str | None]]:
    """(first human turn, the gpt answer after it) of each ShareGPT conversation."""
    if isinstance(data, dict):
        data = data.get("data", data.get("conversations_list", [data]))
    pairs = []
    for item in data:
        conv = item.get("conversations") or item.get("conversation") if isinstance(item, dict) else None
        if not conv:
            continue
        for k, turn in enumerate(conv):
            if turn.get("from") in ("human", "user"):
                nxt = conv[k + 1] if k + 1 < len(conv) else None
                answer = nxt.get("value") if nxt and nxt.get("from") in ("gpt", "assistant", "chatgpt") else None
                pairs.append((turn.get("value", ""), answer))
                break
    return pairs


def load_dataset_entries(path: str | Path) -> list[dict[str, Any]]:
    """Read a dataset into entries {prompt | messages | input_ids, [output_text], [max_tokens]}.

    `.jsonl`: one object per line with `prompt`, `messages` or `input_ids`
    (optional `max_tokens` / `output_len`). A `.json` file (or any file that
    parses as one JSON document) in ShareGPT form: a list of
    `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`;
    the first human turn is the prompt, the gpt answer's length the output length.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
    text = path.read_text()
    doc = None
    if path.suffix != ".jsonl":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
    if doc is not None and not (isinstance(doc, dict) and any(k in doc for k in ("prompt", "messages",
                                                                                 "input_ids"))):
        return [{"prompt": p, "output_text": a} for p, a in _sharegpt_pairs(doc)]
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON: {err.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object")  # noqa: TRY004 - a bad file, like the lines above
        if "conversations" in obj:
            entries += [{"prompt": p, "output_text": a} for p, a in _sharegpt_pairs([obj])]
            continue
        e = {k: obj[k] for k in ("prompt", "messages", "input_ids") if obj.get(k) is not None}
        if len(e) != 1:
            raise ValueError(f"{path}:{n}: give exactly one of prompt, messages, input_ids")
        for k in ("max_tokens", "output_len"):
            if obj.get(k) is not None:
                e["max_tokens"] = int(obj[k])
        entries.append(e)
    return entries


def dataset_requests(entries: Sequence[dict[str, Any]], tokenizer: Any, num_requests: int,
                     default_output_len: int | None, seed: int = 0, max_input_len: int | None = None,
                     max_output_len: int | None = None) -> list[BenchRequest]:
    """Tokenize entries into requests and draw `num_requests` of them (seeded shuffle; cycles if short).

    Output length: the entry's max_tokens, else the token count of its answer
    (ShareGPT), else `default_output_len`. `default_output_len` given with an
    answer overrides nothing; pass `max_output_len` to cap.
    """
    usable = []
    for e in entries:
        if "input_ids" in e:
            ids = [int(t) for t in e["input_ids"]]
        elif "messages" in e:
            ids = tokenizer.encode(tokenizer.apply_chat_template(e["messages"], add_generation_prompt=True))
        else:
            ids = tokenizer.encode(e["prompt"])
        if "max_tokens" in e:
            n_out = e["max_tokens"]
        elif e.get("output_text"):
            n_out = len(tokenizer.encode(e["output_text"]))
        elif default_output_len is not None:
            n_out = default_output_len
        else:
            continue   # a ShareGPT prompt with no answer and no --output-len
        if max_output_len is not None:
            n_out = min(n_out, max_output_len)
        if not ids or n_out < 1 or (max_input_len is not None and len(ids) > max_input_len):
            continue
        usable.append((ids, n_out))
    if not usable:
        raise ValueError("the dataset has no usable entries (empty prompts, no output length, or all too long)")
    rng = random.Random(seed)
    order = list(range(len(usable)))
    rng.shuffle(order)
    reqs = []
    for i in range(num_requests):
        ids, n_out = usable[order[i % len(order)]]
        reqs.append(BenchRequest(list(ids), n_out, i))
    return reqs


# ---- arrivals -------------------------------------------------------------------

def arrival_offsets(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: Poisson arrivals at `request_rate` req/s; inf = all at 0."""
    if request_rate <= 0:
        raise ValueError(f"request rate {request_rate} must be > 0")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed + 0x5EED)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out


def parse_rates(spec: str) -> list[float]:
    """'2' | '1,2,4' | 'inf' -> list of req/s."""
    rates = []
    for part in str(spec).split(","):
        part = part.strip().lower()
        if not part:
            continue
        r = math.inf if part in ("inf", "infinity", "max") else float(part)
        if r <= 0:
            raise ValueError(f"request rate {part} must be > 0 (or inf)")
        rates.append(r)
    if not rates:
        raise ValueError(f"no request rate in {spec!r}")
    return rates


def parse_int_list(spec: str, what: str) -> list[int]:
    vals = [int(p) for p in str(spec).split(",") if p.strip()]
    if not vals or min(vals) < 1:
        raise ValueError(f"{what} {spec!r}: give positive integers, comma separated")
    return vals
