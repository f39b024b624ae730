"""What the scheduler tests share (test_scheduler.py, test_scheduler_admission.py): sequences,
a scheduler over a block manager, and one step with a fixed 'sampled' token."""

from __future__ import annotations

from disagg_mpi.engine.block_manager import BlockManager
from disagg_mpi.engine.scheduler import ScheduledStep, Scheduler
from disagg_mpi.engine.sequence import Sequence

EOS = 2


def make_seq(req_id: int, prompt_len: int, max_tokens: int = 4, **kw) -> Sequence:
    prompt = [10 + (req_id * 31 + i) % 50 for i in range(prompt_len)]
    return Sequence(req_id, prompt, max_tokens, eos_token_ids={EOS}, **kw)


def make_sched(num_blocks=64, block_size=4, max_batch_size=4, max_num_tokens=16, reuse=False, **bypass):
    bm = BlockManager(num_blocks, block_size, enable_prefix_reuse=reuse)
    return Scheduler(bm, max_batch_size, max_num_tokens, **bypass)


def run_step(sched: Scheduler, token: int = 7) -> tuple[ScheduledStep, list[Sequence]]:
    """Schedule, build inputs, 'sample' `token` for each sampling sequence, update."""
    step = sched.schedule()
    inputs = sched.make_step_inputs(step)
    return step, sched.update(step, {r: token for r in inputs.sample_req_ids})
