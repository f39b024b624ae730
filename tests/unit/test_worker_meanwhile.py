"""The leader's hand-off work while a decode step runs (runtime/worker.py: `_Meanwhile`): an error
there must not read as the step's failure (the step would retry its requests one by one); it is
kept, nothing more runs, and the loop raises it after the step."""
from __future__ import annotations

from disagg_mpi.runtime import worker


def test_an_error_while_a_step_runs_is_kept_for_the_loop(monkeypatch):
    calls = []

    def between(comms, engine, group):
        calls.append(1)
        raise ValueError("rank 3 sent Bogus() to an executor leader")

    monkeypatch.setattr(worker, "_between_steps", between)
    m = worker._Meanwhile(None, None, None)
    m()   # does not raise inside the step
    m()
    assert isinstance(m.error, ValueError) and "Bogus" in str(m.error)
    assert calls == [1]   # stopped after the first error


def test_meanwhile_runs_the_between_steps_work(monkeypatch):
    seen = []
    monkeypatch.setattr(worker, "_between_steps", lambda c, e, g: seen.append((c, e, g)) or True)
    m = worker._Meanwhile("comms", "engine", "group")
    m()
    m()
    assert seen == [("comms", "engine", "group")] * 2 and m.error is None
