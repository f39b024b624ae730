"""`best_of` (/v1/completions): sample `best_of` candidates per prompt, return the `n` best.

"Best" is OpenAI's and vLLM's: the highest cumulative log-probability of the sampled tokens
(`Result.log_probs`, the model's own values before temperature or penalties, api.OutputConfig).
Every candidate is generated and billed (usage counts all their tokens); none is streamed
(OpenAI refuses `stream` with `best_of` > `n`: the best is known only at the end).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..api import Response


def cumulative_logprob(resp: Response) -> float:
    """The sum of the sampled tokens' log-probabilities (-inf when there are none to compare)."""
    lps = resp.result.log_probs if resp.result is not None else None
    return sum(lp.logprob for lp in lps) if lps else float("-inf")


def pick_best(scores: Sequence[float], best_of: int, n: int) -> list[int]:
    """Indices into the candidates (prompt i's are [i * best_of, (i + 1) * best_of)) of the n best of
    each prompt, best first; ties keep the earlier candidate."""
    keep = []
    for start in range(0, len(scores), best_of):
        group = range(start, min(start + best_of, len(scores)))
        keep += sorted(group, key=lambda i: (-scores[i], i))[:n]
    return keep


def best_candidates(finals: list[Response], best_of: int, n: int) -> tuple[list[int], int]:
    """(the chosen candidates' indices, the completion tokens of all candidates: what usage bills)."""
    billed = sum(len(r.result.output_token_ids) for r in finals if r.result is not None)
    return pick_best([cumulative_logprob(r) for r in finals], best_of, n), billed


def without_logprobs(resp: Response) -> Response:
    """The response without the logprobs computed only to rank it (the client did not ask)."""
    return dataclasses.replace(resp, result=dataclasses.replace(resp.result, log_probs=None))
