"""paged_attention (batched fresh prefills + per-sequence rest) vs a plain per-sequence reference (CPU)."""
import pytest
import torch
import torch.nn.functional as F

from disagg_mpi.model import AttentionMetadata, attention, forward_context, load_model
from disagg_mpi.model.attention import StepIndex, paged_attention, write_kv

BS = 4
LAYER = 1     # pool holds 2 layers: the right one must be read
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _step(specs, hq, hkv, dtype, d=16, seed=0, device="cpu"):
    """One step over sequences (cached, new): earlier tokens already in the pool, `new` computed now.

    Returns (out of paged_attention, per-sequence reference), on the CPU; the step runs on `device`.
    Block ids are handed out interleaved across sequences so no table is contiguous.
    """
    g = torch.Generator().manual_seed(seed)
    b = len(specs)
    per = max(-(-(c + n) // BS) for c, n in specs)
    tables = torch.tensor([[j * b + (b - 1 - i) for j in range(per)] for i in range(b)])
    pool = torch.zeros(b * per, 2, 2, hkv, BS, d, dtype=dtype)
    hist = [(torch.randn(c + n, hkv, d, generator=g).to(dtype), torch.randn(c + n, hkv, d, generator=g).to(dtype))
            for c, n in specs]
    qs = [torch.randn(n, hq, d, generator=g).to(dtype) for _, n in specs]

    def slot(i, p):
        return int(tables[i, p // BS]) * BS + p % BS

    for i, (c, _) in enumerate(specs):          # the cache of earlier steps
        for p in range(c):
            pool[slot(i, p) // BS, LAYER, 0, :, p % BS] = hist[i][0][p]
            pool[slot(i, p) // BS, LAYER, 1, :, p % BS] = hist[i][1][p]
    slots, qsl = [], [0]
    for i, (c, n) in enumerate(specs):
        slots += [slot(i, p) for p in range(c, c + n)]
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long), qsl, [c + n for c, n in specs], tables, BS)
    q = torch.cat(qs).to(device)
    k = torch.cat([h[0][c:] for h, (c, _) in zip(hist, specs)]).to(device)
    v = torch.cat([h[1][c:] for h, (c, _) in zip(hist, specs)]).to(device)
    pool = pool.to(device)
    idx = StepIndex.build(meta, pool.device)
    write_kv(pool, LAYER, k, v, idx)
    out = paged_attention(q, k, v, pool, LAYER, idx)
    ref = torch.cat([_reference(qi, *h, c) for qi, h, (c, _) in zip(qs, hist, specs)])
    return out.cpu(), ref


def _reference(q, k, v, cached):
    """Query j of q [n, Hq, D] (position cached + j) over keys 0..cached + j, in float64."""
    n, hq, d = q.shape
    rep = hq // k.shape[1]
    q, k, v = (x.double().transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
    scores = q @ k.transpose(1, 2) / d ** 0.5                       # [Hq, n, ctx]
    visible = torch.arange(k.shape[1])[None, :] <= cached + torch.arange(n)[:, None]
    w = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (w @ v).transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(9, 3), (4, 2)])
@pytest.mark.parametrize("lens", [[8, 8, 8, 8], [5, 1, 12, 3, 7], [40, 3, 17, 1, 25, 9], [6], [1]],
                         ids=["equal", "varied", "groups", "one", "one-token"])
def test_fresh_prefill(lens, heads, dtype):
    out, ref = _step([(0, n) for n in lens], *heads, dtype)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(9, 3), (4, 2)])
@pytest.mark.parametrize("specs", [
    [(0, 6), (10, 1), (0, 1), (5, 3), (0, 9), (7, 0), (3, 5), (0, 6)],                 # one decode
    [(0, 6), (10, 1), (0, 1), (5, 3), (3, 1), (0, 9), (7, 0), (21, 1), (3, 5), (1, 1)],  # four, batched
], ids=["lone-decode", "decodes"])
@pytest.mark.parametrize("batched", [True, False], ids=["decodes-batched", "decodes-alone"])
def test_mixed_step(monkeypatch, specs, heads, dtype, batched):
    """Fresh prefills, decodes, chunked-prefill continuations and an idle sequence in one step
    (decodes batched as on CUDA, or one at a time as on CPU)."""
    monkeypatch.setitem(attention.BATCH_DECODES, "cpu", batched)
    out, ref = _step(specs, *heads, dtype)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.fixture
def sdpa_batches(monkeypatch):
    """The batch size of every SDPA call made while the test runs."""
    seen = []
    real = F.scaled_dot_product_attention

    def counting(*a, **kw):
        seen.append(a[0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return seen


@pytest.mark.parametrize("specs, batches", [
    ([(0, 16)] * 8, [8]),                               # equal lengths: one call
    ([(0, n) for n in (9, 16, 12, 10, 15)], [5]),       # within a factor of 2: one padded call
    ([(0, n) for n in (33, 2, 16, 1, 9, 5)], [1, 2, 1, 1, 1]),   # groups {33} {16, 9} {5} {2} {1}
    ([(0, 8), (4, 1), (0, 8), (6, 3), (0, 5)], [3, 1, 1]),       # fresh batched, the others alone
    ([(0, 8), (4, 1), (9, 1), (6, 3), (2, 1), (17, 1)], [1, 4, 1]),   # the decodes of a mixed step: one call
])
def test_calls_do_not_grow_with_batch(monkeypatch, sdpa_batches, specs, batches):
    """Batch size of each SDPA call (grouping as on CUDA: lengths within 2x share a call, decodes one)."""
    monkeypatch.setitem(attention.PREFILL_SPREAD, "cpu", 2)
    monkeypatch.setitem(attention.BATCH_DECODES, "cpu", True)
    seen = sdpa_batches
    out, ref = _step(specs, 4, 2, torch.float32)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    assert seen == batches


def test_decodes_grouped_under_the_gather_budget(monkeypatch, sdpa_batches):
    """One long context must not pad many short ones: decodes go in runs by length under the budget."""
    monkeypatch.setitem(attention.BATCH_DECODES, "cpu", True)
    monkeypatch.setattr(attention, "DECODE_GATHER_TOKENS", 16)
    lens = {0: 4, 1: 5, 2: 8, 3: 30, 4: 40}
    assert attention.decode_groups([0, 1, 2, 3, 4], lens, BS) == [[0, 1], [2], [3], [4]]   # 2 x 2 x 4 = 16
    # contexts 3, 5, 10, 18 (block size 4): {3, 5} pad to 2 x 2 blocks = 16 tokens; 10 and 18 alone
    out, ref = _step([(0, 8), (4, 1), (9, 1), (6, 3), (2, 1), (17, 1)], 4, 2, torch.float32)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    assert sdpa_batches == [1, 2, 1, 1, 1]


def test_cpu_batches_only_equal_lengths(sdpa_batches):
    """On CPU padding costs more than the launches it saves: only equal lengths share a call."""
    seen = sdpa_batches
    out, ref = _step([(0, 9), (0, 16), (0, 9), (0, 12), (0, 16), (0, 16)], 4, 2, torch.float32)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    assert seen == [3, 1, 2]   # {16 x3} {12} {9 x2}


def test_plan_built_once_per_step():
    meta = AttentionMetadata(torch.arange(5), [0, 3, 5], [3, 2], torch.tensor([[0], [1]]), BS)
    idx = StepIndex.build(meta, torch.device("cpu"))
    plan = idx.prefill_plan()
    assert idx.prefill_plan() is plan and len(plan.groups) == 2 and plan.rest == []  # CPU: 3 and 2 apart


def test_rows_in_one_run_are_sliced_not_gathered():
    """A mixed step's fresh prompt and its decodes each sit in one run of rows: they are read and
    written as slices (a gather and a scatter a layer each saved), others keep their row indices."""
    from disagg_mpi.model.attention import FreshGroup, _decode_rows, _group

    # seqs 0, 1: decodes at rows 0, 1; seq 2: a fresh 4-token prompt at rows 2..5; seq 3: a decode at row 6
    qsl, lens = [0, 1, 2, 6, 7], [5, 9, 4, 3]
    g = _group([2], qsl, lens, 7, torch.device("cpu"))
    assert g.span == (2, 6) and g.src is None and g.rows.tolist() == [2, 3, 4, 5]
    q, k, v = torch.randn(3, 7, 2, 8).unbind(0)
    alone = FreshGroup(1, 4, None, None, None).attend(q[2:6], k[2:6], v[2:6])   # the prompt's rows alone
    assert torch.equal(g.attend(q, k, v), alone)
    tables = torch.arange(8).view(4, 2)
    d = _decode_rows([1, 0], qsl, lens, tables, 4)
    assert d.span == (0, 2) and d.rows.tolist() == [0, 1] and d.tables.tolist() == [[0, 1], [2, 3]]
    assert d.take(torch.arange(7)).tolist() == [0, 1]
    apart = _decode_rows([0, 3], qsl, lens, tables, 4)
    assert apart.span is None and apart.take(torch.arange(7)).tolist() == [0, 6]


def test_model_batched_prefill_matches_one_by_one():
    """The tiny model over several prompts in one step gives each prompt's logits run alone."""
    model = load_model("random:tiny", seed=5)
    prompts = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 12, 13], [9], [900, 800, 700, 600, 500, 400],
               [21, 22, 23, 24, 25, 26, 27, 28, 29]]

    def prefill(batch):
        b, per = len(batch), -(-max(map(len, batch)) // BS)
        tables = torch.tensor([[j * b + i for j in range(per)] for i in range(b)])
        pool = model.allocate_kv_pool(b * per, BS)
        slots = [int(tables[i, p // BS]) * BS + p % BS for i, s in enumerate(batch) for p in range(len(s))]
        qsl = [0]
        for s in batch:
            qsl.append(qsl[-1] + len(s))
        meta = AttentionMetadata(torch.tensor(slots), qsl, [len(s) for s in batch], tables, BS)
        pos = torch.tensor([p for s in batch for p in range(len(s))])
        with forward_context(meta):
            return model.compute_logits(model(torch.tensor([t for s in batch for t in s]), pos, pool))

    alone = torch.cat([prefill([p]) for p in prompts])
    torch.testing.assert_close(prefill(prompts), alone, atol=1e-4, rtol=1e-4)
