"""DISAGG_STEP_LOG: one JSON line per engine step, from a real in-process executor."""
import json

from disagg_mpi.engine.step_log import step_record


def test_step_record_tells_decode_rows_from_prefill_chunks():
    r = step_record(100.0, 0.0125, [1, 1, 37, 1])
    assert r == {"t": 100.0, "ms": 12.5, "seqs": 4, "tokens": 40, "decode": 3, "max_chunk": 37}


def test_every_step_of_a_request_is_logged(tmp_path, monkeypatch):
    from disagg_mpi.api import ExecutorConfig, Request
    from disagg_mpi.engine.executor import Executor

    monkeypatch.setenv("DISAGG_STEP_LOG", str(tmp_path))
    ex = Executor("random:tiny", ExecutorConfig())
    [resp] = ex.generate([Request(list(range(3, 20)), 5, ignore_eos=True)])
    ex.shutdown()
    lines = [json.loads(x) for x in (tmp_path / "executor0.jsonl").read_text().splitlines()]
    assert len(resp.result.output_token_ids) == 5
    assert lines[0]["max_chunk"] == 17 and lines[0]["decode"] == 0   # the prompt, one chunk
    assert [x["decode"] for x in lines[1:]] == [1] * 4                 # then one decode step a token
    assert all(x["ms"] > 0 for x in lines)
