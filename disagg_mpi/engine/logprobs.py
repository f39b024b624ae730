"""Log-probabilities of sampled tokens (OutputConfig.return_log_probs), for the rows that ask.

The values are the model's log-softmax over the vocabulary, taken from the logits **before**
penalties, logit_bias, the min_tokens mask and temperature (vLLM's "raw" logprobs; OpenAI's
are of the model's distribution too): a token's logprob is then a property of the model and the
text so far, the same however it was sampled, on whichever executor sampled it.

One batched computation per step over the rows that asked (a gather, one log_softmax, one topk to
the largest k asked, one host copy); rows that did not ask are not touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..api import MAX_LOGPROBS, OutputConfig, Request, RequestError, TokenLogprobs, as_int
from ..transfer.chunks import device_ids
from .sequence import Sequence as Seq

NOT_ASKED = -1  # StepPlan.logprobs value of a row that wants no logprobs


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int] | torch.Tensor, ks: Sequence[int]
                   ) -> list[TokenLogprobs | None]:
    """Per row of `logits` [B, V] (the model's, unadjusted): the logprob of `tokens[i]` and the
    `ks[i]` best alternatives, or None where ks[i] is NOT_ASKED."""
    return start_logprobs(logits, tokens, ks).result()


class PendingLogprobs:
    """start_logprobs' results on their way to the host: `result()` waits for them (a CUDA event;
    on the CPU they are there already)."""

    __slots__ = ("event", "ids", "ks", "rows", "values")

    def __init__(self, ks: Sequence[int], rows: list[int], values: torch.Tensor | None = None,
                 ids: torch.Tensor | None = None, event: torch.cuda.Event | None = None):
        self.ks, self.rows, self.values, self.ids, self.event = ks, rows, values, ids, event

    def result(self) -> list[TokenLogprobs | None]:
        out: list[TokenLogprobs | None] = [None] * len(self.ks)
        if not self.rows:
            return out
        if self.event is not None:
            self.event.synchronize()
        host, ids = self.values.tolist(), self.ids.tolist()
        for j, i in enumerate(self.rows):
            k = self.ks[i]
            out[i] = TokenLogprobs(host[j][0], tuple(ids[j][:k]), tuple(host[j][1:1 + k]))
        return out


def start_logprobs(logits: torch.Tensor, tokens: Sequence[int] | torch.Tensor, ks: Sequence[int]
                   ) -> PendingLogprobs:
    """token_logprobs, queued: computed on the logits' device and copied to the host without a
    stream sync, so a CUDA graph step launched next (overlap.py) may reuse the logits' buffer
    while they travel. `tokens` may be a device tensor (the step's greedy tokens)."""
    if logits.dim() != 2 or not logits.shape[0] == len(tokens) == len(ks):
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)}, {len(tokens)} tokens and {len(ks)} "
                         "k values must agree on the batch size")
    rows = [i for i, k in enumerate(ks) if k != NOT_ASKED]
    if not rows:
        return PendingLogprobs(ks, rows)
    device = logits.device
    index = device_ids(rows, device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    if isinstance(tokens, torch.Tensor):
        chosen = tokens.to(device).index_select(0, index)
    else:
        chosen = device_ids([int(tokens[i]) for i in rows], device)
    picked = lp.gather(1, chosen[:, None])
    kmax = max(ks[i] for i in rows)
    # topk is stable enough here: ties between alternatives are broken by index, as vLLM's are.
    top_v, top_i = lp.topk(kmax, dim=-1) if kmax else (lp[:, :0], lp[:, :0].long())
    values = torch.cat([picked, top_v], dim=1)
    if device.type != "cuda":
        return PendingLogprobs(ks, rows, values, top_i)
    host_v = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host_i = torch.empty(top_i.shape, dtype=top_i.dtype, pin_memory=True)
    host_v.copy_(values, non_blocking=True)
    host_i.copy_(top_i, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingLogprobs(ks, rows, host_v, host_i, event)


# Prompt rows per logits slice: [256, 128k] fp32 is 128 MB, where a whole 8k prompt's would be 4 GB.
PROMPT_SLICE_ROWS = 256


def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    rows: Sequence[int], targets: Sequence[int], ks: Sequence[int],
                    slice_rows: int = PROMPT_SLICE_ROWS) -> list[TokenLogprobs]:
    """Request.num_prompt_logprobs: for each flat row of `hidden` [N, H] in `rows`, the logprob of
    `targets[i]` (the prompt token that follows that position) and its `ks[i]` best alternatives.
    The logits are made and reduced `slice_rows` rows at a time, so memory stays
    [slice_rows, vocab] however long the prompt."""
    if not len(rows) == len(targets) == len(ks):
        raise ValueError(f"prompt_logprobs: {len(rows)} rows, {len(targets)} targets and {len(ks)} k values "
                         "must agree")
    out: list[TokenLogprobs] = []
    for a in range(0, len(rows), slice_rows):
        index = torch.tensor(rows[a:a + slice_rows], dtype=torch.long, device=hidden.device)
        logits = compute_logits(hidden.index_select(0, index))
        out.extend(token_logprobs(logits, targets[a:a + slice_rows], ks[a:a + slice_rows]))
    return out


def prompt_logprobs_k(r: Request) -> int:
    """Request.num_prompt_logprobs as a k, or NOT_ASKED; RequestError unless None or in [0, MAX_LOGPROBS]."""
    pk = getattr(r, "num_prompt_logprobs", None)
    if pk is None:
        return NOT_ASKED
    k = as_int(pk)
    if k is None or not 0 <= k <= MAX_LOGPROBS:
        raise RequestError(f"num_prompt_logprobs={pk!r} must be None (not asked) or an integer in "
                           f"[0, {MAX_LOGPROBS}]", "num_prompt_logprobs")
    return k


def prompt_rows(items: list[tuple[Seq, int]], query_start_loc: list[int]
                ) -> tuple[list[int], list[int], list[int], list[Seq]]:
    """StepPlan.prompt_rows / prompt_targets / prompt_ks for the step's prefill chunks that ask, and the
    sequence of each row. The logits at prompt position p score prompt token p + 1, so a chunk
    [start, start + n) contributes its positions below the prompt's last (whose logits sample)."""
    rows, targets, ks, owners = [], [], [], []
    for (seq, n), base in zip(items, query_start_loc):
        if seq.num_prompt_logprobs == NOT_ASKED:
            continue
        start = seq.num_computed_tokens
        for p in range(start, min(start + n, len(seq.prompt_ids) - 1)):
            rows.append(base + p - start)
            targets.append(seq.prompt_ids[p + 1])
            ks.append(seq.num_prompt_logprobs)
            owners.append(seq)
    return rows, targets, ks, owners


def logprobs_k(r: Request) -> int:
    """The request's top-alternatives count, or NOT_ASKED; RequestError unless in [0, MAX_LOGPROBS]."""
    oc = r.output_config
    if not isinstance(oc, OutputConfig) or not isinstance(oc.return_log_probs, bool):
        raise RequestError("output_config must be an OutputConfig with return_log_probs true or false",
                           "output_config")
    if not oc.return_log_probs:
        return NOT_ASKED
    k = as_int(r.num_logprobs)
    if k is None or not 0 <= k <= MAX_LOGPROBS:
        raise RequestError(f"num_logprobs={r.num_logprobs!r} must be an integer in [0, {MAX_LOGPROBS}]",
                           "num_logprobs")
    return k


def logprobs_plan(seqs: list[Seq]) -> list[int]:
    """StepPlan.logprobs: each row's k, or [] when no row asks (nothing is computed then)."""
    ks = [s.num_logprobs for s in seqs]
    return ks if any(k != NOT_ASKED for k in ks) else []
