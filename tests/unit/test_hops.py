"""Per-request hop timestamps (disagg_mpi/hops.py): the pure functions, the metrics record that carries
them across ranks, rank 0's bookkeeping, and where users see them (run output lines, bench rows and
reports). The real multi-rank path is tested in tests/mpi/test_disaggregated.py and
tests/unit/test_serve_http.py."""

from __future__ import annotations

import re
from itertools import pairwise

import pytest

from disagg_mpi import hops
from disagg_mpi.api import Request, RequestMetrics, Response, Result
from disagg_mpi.bench.metrics import RequestRecord, aggregate, flatten, hop_summary
from disagg_mpi.bench.report import format_table
from disagg_mpi.hops import CHAIN, DIRECT_CHAIN, Hop, Kind, SseWrites, by_kind, durations, durations_ms
from disagg_mpi.protocol import ProtocolError, Responses, decode, encode

T0 = 1000.0  # (a real time.time() keeps 0.2 us: these tests compare ms exactly)


def _disagg(**skip) -> dict[str, float]:
    """A disaggregated request's stamps, 1 ms apart (hop i at T0 + i ms), but the hops in `skip`."""
    chain = [h.value for h, _ in CHAIN if h.value not in skip]
    return {h: T0 + i * 1e-3 for i, h in enumerate(chain)}


def test_durations_walk_the_chain_in_order():
    h = _disagg()
    d = durations(h)
    assert [(a, b) for a, b, _ in d] == list(zip([x.value for x, _ in CHAIN], [x.value for x, _ in CHAIN[1:]]))
    assert all(ms == pytest.approx(1.0) for _, _, ms in d)
    # The dict's order does not matter: the chain's does.
    assert durations(dict(reversed(list(h.items())))) == d


def test_durations_skip_hops_the_request_did_not_pass():
    agg = {Hop.ARRIVAL.value: T0, Hop.DISPATCH.value: T0 + 0.001, Hop.ADMITTED.value: T0 + 0.003,
           Hop.FIRST_CHUNK.value: T0 + 0.004, Hop.FIRST_TOKEN.value: T0 + 0.014, Hop.FINAL.value: T0 + 0.050,
           Hop.SSE_FIRST.value: T0 + 0.020}  # (outside the chain)
    got = durations_ms(agg)
    assert list(got) == ["arrival->dispatch", "dispatch->admitted", "admitted->first_chunk",
                         "first_chunk->first_token", "first_token->final"]
    assert got["first_chunk->first_token"] == pytest.approx(10.0)
    assert durations({}) == [] and durations({Hop.FINAL.value: T0}) == []


def test_negative_durations_are_kept():
    """Clocks of two hosts that disagree show as a negative segment, not as a silently dropped one."""
    got = durations_ms({Hop.CTX_ANSWER_SENT.value: T0 + 0.002, Hop.CTX_ANSWER_RECEIVED.value: T0})
    assert got == {"ctx_answer_sent->ctx_answer_received": pytest.approx(-2.0)}


def test_by_kind_sums_the_segments_by_what_they_were():
    h = _disagg()
    kinds = by_kind(h)
    counts = {k.value: sum(1 for _, kk in CHAIN if kk is k) for k in Kind}
    assert kinds == {k: pytest.approx(float(n)) for k, n in counts.items() if n}
    assert sum(kinds.values()) == pytest.approx((len(CHAIN) - 1) * 1.0)
    # Without a claim grant (a CUDA IPC pull landed first) the claim to landed time is all copy.
    h = _disagg(claim_granted=1)
    assert durations_ms(h)["claim_sent->kv_landed"] == pytest.approx(1.0)
    assert by_kind(h)["copy"] == pytest.approx(1.0) and by_kind(h)["message"] == pytest.approx(3.0)


def test_the_docstring_table_is_the_chain():
    """One table of hops: the module's docstring lists the chain's hops and kinds in its order."""
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| [^|]+ \| (\S+) \|$", hops.__doc__, re.MULTILINE)
    assert rows == [(h.value, k.value if k else "-") for h, k in CHAIN]
    assert {h for h, _ in CHAIN} | {Hop.SSE_FIRST, Hop.CTX_READY_SENT} == set(Hop)
    assert Hop.SSE_FIRST.value in hops.__doc__
    # The direct hand-off's chain, as the docstring spells it out.
    direct = " -> ".join(h.value for h, _ in DIRECT_CHAIN[1:])
    assert direct in " ".join(hops.__doc__.split())
    assert {h for h, _ in DIRECT_CHAIN} | {Hop.SSE_FIRST, Hop.CTX_ANSWER_SENT, Hop.CTX_ANSWER_RECEIVED} == set(Hop)


def _direct(answer_at: float) -> dict[str, float]:
    """A direct hand-off's stamps, 1 ms apart along DIRECT_CHAIN; rank 0's context-answer hops beside it."""
    h = {x.value: T0 + i * 1e-3 for i, (x, _) in enumerate(DIRECT_CHAIN)}
    h[Hop.CTX_ANSWER_SENT.value] = h[Hop.CTX_READY_SENT.value] + 1e-4
    h[Hop.CTX_ANSWER_RECEIVED.value] = answer_at
    return h


def test_a_direct_hand_off_walks_its_own_chain():
    """No rank-0 hop between the context's notice and the generation side: the segments say so, and
    rank 0's context-answer stamps (here arriving late) neither break nor lengthen the chain."""
    h = _direct(answer_at=T0 + 0.5)
    assert hops.chain_of(h) is DIRECT_CHAIN and hops.chain_of(_disagg()) is CHAIN
    got = durations_ms(h)
    assert list(got) == [f"{a.value}->{b.value}" for (a, _), (b, _) in pairwise(DIRECT_CHAIN)]
    assert "ctx_ready_sent->gen_admitted" in got and not any("ctx_answer" in k for k in got)
    assert all(ms == pytest.approx(1.0) for ms in got.values())
    kinds = by_kind(h)
    assert sum(kinds.values()) == pytest.approx(len(DIRECT_CHAIN) - 1.0) and kinds["rank0"] == pytest.approx(4.0)


def test_handoff_ms_starts_at_the_first_message_about_the_held_context():
    assert hops.handoff_ms(_direct(T0 + 0.5)) == pytest.approx(4.0)  # ctx_ready_sent -> kv_landed
    assert hops.handoff_ms(_disagg()) == pytest.approx(6.0)  # ctx_answer_sent -> kv_landed
    assert hops.handoff_ms({Hop.FIRST_TOKEN.value: T0}) is None


def test_unknown_hops_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown hops \['teleported'\]"):
        RequestMetrics.from_dict({"hops": {"teleported": T0}})
    msg = Responses(2, [Response(1, Result([5], True, "length"))], 0, 0)
    assert decode(encode(msg)).responses[0].result.metrics.hops is None
    msg.responses[0].result.metrics.hops = {"teleported": T0}  # (a rank of another version, say)
    with pytest.raises(ProtocolError, match="teleported"):
        decode(encode(msg))


def test_metrics_carry_hops_across_ranks_and_merge_them():
    ctx = RequestMetrics(executor=0)
    ctx.stamp(Hop.ADMITTED, T0)
    ctx.stamp(Hop.CTX_ANSWER_SENT, T0 + 1)
    got = decode(encode(Responses(0, [Response(7, Result([3], True, None, metrics=ctx))], 1, 2)))
    back = got.responses[0].result.metrics
    assert back.hops == {"admitted": T0, "ctx_answer_sent": T0 + 1} and back.passed(Hop.ADMITTED)
    assert not back.passed(Hop.FINAL) and not RequestMetrics().passed(Hop.FINAL)
    # Rank 0 keeps its own hops and adds each executor's (theirs win a tie); other fields as before.
    mine = RequestMetrics()
    mine.stamp(Hop.ARRIVAL, T0 - 1)
    mine.merge(back, skip=("executor",))
    gen = RequestMetrics(kv_transfer_ms=2.0)
    gen.stamp(Hop.KV_LANDED, T0 + 3)
    mine.merge(gen)
    assert mine.hops == {"arrival": T0 - 1, "admitted": T0, "ctx_answer_sent": T0 + 1, "kv_landed": T0 + 3}
    assert mine.executor is None and mine.kv_transfer_ms == 2.0
    # A response without hops sends none (streamed tokens stay small).
    assert "hops" not in RequestMetrics().to_dict()


def test_sse_writes_summary():
    s = SseWrites()
    for t in (10.0, 10.5, 12.0, 12.25):
        s.wrote(t)
    assert (s.count, s.first, s.last, s.max_gap_s) == (4, 10.0, 12.25, 1.5)
    m = RequestMetrics()
    s.stamp_into(m, 9.5)
    assert m.hops == {"http_in": 9.5, "sse_first": 10.0, "http_out": 12.25}
    assert m.sse_events == 4 and m.sse_max_gap_ms == pytest.approx(1500.0)
    m = RequestMetrics()
    SseWrites().stamp_into(m, None)  # nothing written (yet): a count of 0, no times
    assert m.hops is None and m.sse_events == 0
    m = RequestMetrics()
    hops.stamp_http_body(m, 9.5)
    assert m.hops["http_in"] == 9.5 and m.hops["http_out"] >= 9.5


def test_rank0_tracks_stamp_arrival_and_final():
    from disagg_mpi.orchestrator.tracks import Flow, Tracks

    tracks = Tracks()
    gid = tracks.new(Request([1, 2, 3], max_tokens=2), Flow.AUTO)
    tracks.assign(gid, 0, "generation", tracks.next_exec_id())
    gen = RequestMetrics()
    gen.stamp(Hop.FIRST_TOKEN)
    final = tracks.finalize(gid, Response(1, Result([4, 5], True, "length", metrics=gen)))
    h = final.result.metrics.hops
    assert h["arrival"] <= h["first_token"] <= h["final"]


# ---- where users see them -------------------------------------------------------------------------


def _record(idx: int, hop_stamps: dict | None, ok: bool = True) -> RequestRecord:
    sm = {"hops": hop_stamps} if hop_stamps is not None else {}
    return RequestRecord(idx, 8, 4, ok=ok, start=0.0, chunk_times=[0.01, 0.02], end=0.03, output_tokens=4,
                         server_metrics=sm)


def test_bench_rows_and_report_show_where_the_time_went():
    disagg = [_disagg(), {**_disagg(), "claim_sent": T0 + 0.0095}]  # blocks 1.5 ms late, the grant 0.5 ms
    agg = {Hop.ARRIVAL.value: T0, Hop.DISPATCH.value: T0 + 0.001}
    recs = [_record(0, disagg[0]), _record(1, disagg[1]), _record(2, agg), _record(3, None),
            _record(4, _disagg(), ok=False)]
    assert recs[0].to_dict()["hops_ms"] == durations_ms(disagg[0])
    assert "hops_ms" not in recs[3].to_dict()
    s = hop_summary(recs)
    assert s["num_requests"] == 3  # failed requests and servers without hops do not count
    seg = s["segments_ms"]
    assert list(seg)[:3] == ["http_in->arrival", "arrival->dispatch", "dispatch->admitted"]
    assert seg["arrival->dispatch"]["n"] == 3 and seg["claim_sent->claim_granted"]["n"] == 2
    assert seg["gen_admitted->claim_sent"]["p50"] == pytest.approx(1.25)  # (1 and 1.5 ms)
    assert seg["claim_sent->claim_granted"]["p50"] == pytest.approx(0.75)
    assert s["kinds_ms"]["copy"]["p50"] == pytest.approx(1.0)
    assert hop_summary([_record(0, None)]) is None
    summary = aggregate(recs, 1.0)
    assert summary["hops"] == s
    row = flatten(summary)
    assert row["hop_claim_granted->kv_landed_p50"] == pytest.approx(1.0) and row["hop_kind_copy_p50"] == pytest.approx(1.0)
    table = format_table([{"label": "x", **summary}, {"label": "y", **aggregate(recs[3:4], 1.0)}], markdown=True)
    line = next(ln for ln in table.splitlines() if "hop claim_granted->kv_landed p50 (ms)" in ln)
    assert line.split("|")[2:4] == [" 1.00 ", " - "]
    assert "server time: copy p50 (ms)" in table
    # The hand-off (context's first message -> KV landed), classic and direct side by side.
    assert s["handoff_ms"]["n"] == 2 and row["hop_handoff_p50"] == pytest.approx(s["handoff_ms"]["p50"])
    both = hop_summary([_record(0, _disagg()), _record(1, _direct(T0 + 0.5))])
    assert both["handoff_ms"]["p50"] == pytest.approx(5.0)  # (6 ms classic, 4 ms direct)
    assert any("KV hand-off p50 (ms)" in ln for ln in table.splitlines())


def test_run_output_lines_carry_the_hops():
    from disagg_mpi.jobs import output_line

    class Tok:
        def decode(self, ids):
            return "x" * len(ids)

    m = RequestMetrics(ttft_ms=1.0)
    for h, t in _disagg().items():
        m.stamp(Hop(h), t)
    line = output_line("a", Response(1, Result([1, 2], True, "length", metrics=m)), Tok())
    assert line["metrics"]["hops"] == _disagg()  # the stamps as they are (a rounding would drop the ms)
    assert line["hops_ms"] == {k: pytest.approx(v, abs=1e-3) for k, v in durations_ms(_disagg()).items()}
