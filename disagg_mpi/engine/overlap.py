"""Overlapped decode: step N+1 is launched before step N's tokens reach the host.

With CUDA graphs on one rank a decode step is one graph replay, but the host
work around it (reading the tokens back, stop checks, responses, scheduling and
packing the next step) used to leave the GPU idle for 10-20% of a small model's
step. When the next step can only be "the same sequences, one position further"
(a decode-only step, every sequence greedy, none at its max_tokens, nobody
waiting to join), the engine hands the runner that predicted step with this one.
The runner launches it right behind this one, its input ids copied on the
device from this step's greedy tokens, and only then waits for this step's
tokens. On the next call the runner compares the engine's real inputs with the
prediction: equal, the step is already queued; different (a sequence stopped on
EOS or was cancelled), the launched step is dropped. A request that arrives
meanwhile does not spoil it: the engine runs the launched step as predicted and
admits the newcomer in the step after (it would have waited for the launched
step's GPU time either way). Against overlap off, that is the price: a request
arriving during decode starts up to one decode step later.

A dropped step costs GPU time, never correctness: sequences that go on had
their KV written at the same slot with the same token, and a stopped sequence
only wrote into a block it reserved for its max_tokens and never committed to
the prefix cache (the slot is past its last computed token). Everything is on
one stream, so later users of those blocks come after. `DISAGG_OVERLAP_DECODE=0`
turns this off.
"""
from __future__ import annotations

from ..knobs import env_value
from .scheduler import StepInputs


def overlap_enabled() -> bool:
    return env_value("DISAGG_OVERLAP_DECODE")


def next_decode_inputs(inp: StepInputs, block_size: int) -> StepInputs | None:
    """The decode step after `inp` for the same sequences, one position further.

    `input_ids` are left as they were (the runner takes them from the device); None when a
    sequence's next position is past its block table."""
    positions = [p + 1 for p in inp.positions]
    slots = []
    for table, p in zip(inp.block_tables, positions):
        i = p // block_size
        if i >= len(table) or table[i] < 0:
            return None
        slots.append(table[i] * block_size + p % block_size)
    return StepInputs(input_ids=list(inp.input_ids), positions=positions, slot_mapping=slots,
                      query_start_loc=list(inp.query_start_loc),
                      context_lens=[c + 1 for c in inp.context_lens], block_tables=inp.block_tables,
                      sample_indices=list(inp.sample_indices), sample_req_ids=list(inp.sample_req_ids))


def is_predicted(predicted: StepInputs, actual: StepInputs, ids: list[int]) -> bool:
    """Whether `actual` is the predicted step fed with `ids` (the previous step's tokens)."""
    return (actual.input_ids == ids and actual.positions == predicted.positions
            and actual.slot_mapping == predicted.slot_mapping
            and actual.context_lens == predicted.context_lens
            and actual.sample_req_ids == predicted.sample_req_ids
            and actual.sample_indices == predicted.sample_indices
            and actual.query_start_loc == predicted.query_start_loc
            and actual.block_tables == predicted.block_tables)
