"""A step that raises fails only the request that makes it raise.

Rank 0 checks every value before dispatch (orchestrator/admission.py), so a
step should never raise because of a request; if one still does (a check
missed, a state gone bad), failing the whole batch would let one client end
every other client's stream. Instead each sequence of the step runs again
alone: those that still raise are failed, the others keep the tokens of their
solo run. Sampling is keyed by (seed, position) and the KV a step writes
depends only on the sequence, so a solo run gives the token the batched run
would have (engine/sampler.py). Costs one model call per sequence, on failure only.
"""

from __future__ import annotations

from collections.abc import Callable

from .scheduler import ScheduledStep


def retry_alone(step: ScheduledStep, run: Callable[[ScheduledStep], dict[int, int]]
                ) -> tuple[ScheduledStep, dict[int, int], dict[int, Exception]]:
    """Run each item of `step` alone with `run` (a one-item step -> {req_id: token}).

    A sequence forked in this step runs with the one whose row it samples (scheduler.fork).
    Returns the step of those that ran, their sampled tokens, and {req_id: error} of those that raised.
    """
    survivors, sampled, failed = ScheduledStep(), {}, {}
    units: dict[int, list] = {}  # a sequence forked this step (n = 0) samples its leader's row: they go together
    for seq, n in step.items:
        units.setdefault(seq.fork_of if n == 0 and seq.fork_of is not None else seq.req_id, []).append((seq, n))
    for unit in units.values():
        try:
            sampled.update(run(ScheduledStep(unit)))
        except Exception as err:  # noqa: BLE001 - whatever it is, it is this request's alone
            failed.update((seq.req_id, err) for seq, _ in unit)
        else:
            survivors.items.extend(unit)
    return survivors, sampled, failed
