"""Control messages past the MPI library's eager limit, sent by two ranks to each other at once.

With a blocking standard send each rank would wait in its send for the other to post a
receive, which it does only between sends: both wait for ever (the 2-GPU goodput runs hung
so, orchestrator and generation leader). `comms.send` returns at once and `recv_ready`
completes the sends that wait. A broken `send` hangs here; the thread timeout then kills the
rank, which aborts the job (`python -m mpi4py`), so the test fails instead of hanging CI.

Run: mpiexec -n 2 python -m mpi4py -m pytest --with-mpi tests/mpi/test_control_sends.py
"""

from __future__ import annotations

import time

import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from disagg_mpi.protocol import Pull, Tag
from disagg_mpi.runtime import comms

WORLD = MPI.COMM_WORLD


@pytest.mark.world(2)
@pytest.mark.timeout(60, method="thread")
def test_large_control_messages_cross_without_deadlock():
    ctl = WORLD.Dup()
    rank = WORLD.Get_rank()
    other = 1 - rank
    big = list(range(rank, rank + 600_000))  # ~2.4 MB of msgpack: far past any eager limit
    for i in range(3):  # several in a row, then the receives: they come in the order sent
        comms.send(ctl, Pull(i, b"", big), other)
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 3:
        msg = comms.recv_ready(ctl, other, Tag.MEMBER)
        if msg is not None:
            got.append(msg[0])
        assert time.monotonic() < deadline, "the crossing sends did not complete"
    assert [m.req_id for m in got] == [0, 1, 2]
    assert got[0].blocks[:3] == [other, other + 1, other + 2] and len(got[2].blocks) == 600_000
    assert comms.flush_sends(timeout=10)
    WORLD.Barrier()
    ctl.Free()
