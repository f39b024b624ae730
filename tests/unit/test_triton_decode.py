"""Fused RoPE + KV write + paged decode attention vs the two kernels it replaces.

Runs on CUDA, or on CPU under the Triton interpreter:
`TRITON_INTERPRET=1 python -m pytest -q tests/unit/test_triton_decode.py`.
Skips when triton is not installed (CI) or when neither is available.
"""
from __future__ import annotations

import math

import pytest
import torch

from disagg_mpi.model import triton_kernels as tk
from tests.unit.triton_device import DEVICE, pytestmark  # noqa: F401 (skips without triton)

BS = 16


def _rope(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (n,), generator=g)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    f = pos.float()[:, None] * inv[None, :]
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def _case(ctxs, n_q, n_kv, d, dtype, layers=2, seed=0):
    """Random pool / qkv / tables for one decode step; ctx 0 = padding row (slot -1)."""
    g = torch.Generator().manual_seed(seed)
    b = len(ctxs)
    per = [-(-c // BS) for c in ctxs]
    width = max(1, max(per))
    nblocks = sum(per) + 3
    pool = torch.randn(nblocks, layers, 2, n_kv, BS, d, generator=g).to(dtype)
    perm = torch.randperm(nblocks, generator=g).tolist()    # scattered, non-monotonic blocks
    tables = torch.full((b, width), -1, dtype=torch.long)
    slots = torch.full((b,), -1, dtype=torch.long)
    for i, (c, nb) in enumerate(zip(ctxs, per)):
        tables[i, :nb] = torch.tensor(perm[:nb])
        perm = perm[nb:]
        if c:
            p = c - 1
            slots[i] = int(tables[i, p // BS]) * BS + p % BS
    qkv = torch.randn(b, (n_q + 2 * n_kv) * d, generator=g).to(dtype)
    q, k, v = qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1)     # row-strided views
    cos, sin = _rope(b, d, dtype, seed + 1)
    c = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "pool": pool, "slots": slots,
         "tables": tables.flatten(), "table_stride": torch.tensor([width]), "ctx": torch.tensor(ctxs)}
    return {name: t.to(DEVICE) for name, t in c.items()}


def _two_kernels(c, layer, n_q, n_kv, d):
    pool = c["pool"].clone()
    qr = tk.rope_write_kv(c["q"], c["k"], c["v"], c["cos"], c["sin"], pool, layer, c["slots"], n_q, n_kv, d)
    out = tk.paged_decode_attention(qr, pool, layer, c["tables"], c["table_stride"], c["ctx"])
    return out, pool


def _fused(c, layer, n_q, n_kv, d):
    pool = c["pool"].clone()
    out = tk.rope_write_decode_attention(c["q"], c["k"], c["v"], c["cos"], c["sin"], pool, layer,
                                         c["slots"], c["tables"], c["table_stride"], c["ctx"], n_q, n_kv, d)
    return out, pool


def _torch_ref(c, pool, layer, n_q, n_kv, d):
    """Plain fp32 attention over the pool after the write (independent of the kernels)."""
    b = c["q"].shape[0]
    q = c["q"].float().reshape(b, n_q, d)
    cos, sin = c["cos"].float(), c["sin"].float()
    h = d // 2
    q = q * cos + torch.cat((-q[..., h:], q[..., :h]), -1) * sin
    width = int(c["table_stride"][0])
    tables = c["tables"].view(-1, width)
    out = torch.zeros(b, n_q, d)
    for i in range(b):
        n = int(c["ctx"][i])
        if n == 0:
            continue
        t = torch.arange(n)
        kv = pool[tables[i, t // BS].cpu(), layer, :, :, (t % BS)].float().cpu()   # [n, 2, n_kv, d]
        k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
        k = k.repeat_interleave(n_q // n_kv, 0)
        v = v.repeat_interleave(n_q // n_kv, 0)
        w = torch.softmax(q[i].cpu()[:, None, :] @ k.transpose(1, 2) / math.sqrt(d), -1)
        out[i] = (w @ v)[:, 0]
    return out


# ctx: 1, exactly one block, block + 1, several blocks not a multiple of BS, > one 64-wide
# tile (several tiles, the new token alone in the last one), and padding rows (ctx 0).
CTXS = [5, 0, 16, 17, 53, 64, 65, 130, 1, 0]
SHAPES = [(9, 3, 64, CTXS), (32, 8, 128, [3, 0, 70, 33])]


@pytest.mark.parametrize("tile", [None, (32, 4, 3), (64, 2, 2), (128, 4, 2)],
                         ids=["auto", "tile32", "tile64w2", "tile128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_q,n_kv,d,ctxs", SHAPES, ids=["9q3kv_d64", "32q8kv_d128"])
def test_fused_matches_two_kernels(monkeypatch, n_q, n_kv, d, ctxs, dtype, tile):
    """Every tile the kernel may be launched with (decode_tile picks by batch size)."""
    if tile is not None:
        monkeypatch.setattr(tk, "decode_tile", lambda *a: tile)
    layer = 1
    c = _case(ctxs, n_q, n_kv, d, dtype)
    ref, ref_pool = _two_kernels(c, layer, n_q, n_kv, d)
    out, pool = _fused(c, layer, n_q, n_kv, d)
    assert out.shape == (len(ctxs), n_q, d) and out.dtype == dtype
    # the pool afterwards: same k, v at the same slots, nothing else touched
    assert torch.equal(pool, ref_pool)
    assert not torch.equal(pool, c["pool"])
    pad = [i for i, n in enumerate(ctxs) if n == 0]
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    # the new token's term is folded in last, not inside its tile: equal up to rounding
    err = (out.float() - ref.float()).abs().max().item()
    print(f"max |fused - two kernels| = {err:.3g}")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    # and both agree with a plain torch attention over the written pool
    want = _torch_ref(c, pool, layer, n_q, n_kv, d)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [2, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_context_matches_one_program_per_head(splits, dtype):
    """Flash-decoding (each context over `splits` programs, then a combine) against the kernel
    with one program per (sequence, KV head): splits with no token (short contexts), the new
    token alone, several tiles per split, padding rows; the pool written once, the same."""
    n_q, n_kv, d = 8, 2, 64
    ctxs = [1, 0, 17, 64, 65, 200, 333]
    c = _case(ctxs, n_q, n_kv, d, dtype)
    args = (c["q"], c["k"], c["v"], c["cos"], c["sin"])
    idx = (c["slots"], c["tables"], c["table_stride"], c["ctx"], n_q, n_kv, d)
    ref_pool, pool = c["pool"].clone(), c["pool"].clone()
    ref = tk.rope_write_decode_attention(*args, ref_pool, 1, *idx, splits=1)
    out = tk.rope_write_decode_attention(*args, pool, 1, *idx, splits=splits)
    assert torch.equal(pool, ref_pool)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_fused_writes_only_the_slots():
    n_q, n_kv, d = 9, 3, 64
    ctxs = [0, 7, 0, 40]
    c = _case(ctxs, n_q, n_kv, d, torch.float32, layers=3)
    _, pool = _fused(c, 2, n_q, n_kv, d)
    moved = (pool != c["pool"]).permute(0, 4, 1, 2, 3, 5).flatten(2).any(-1)   # [blocks, bs]
    want = torch.zeros_like(moved)
    for s in c["slots"].tolist():
        if s >= 0:
            want[s // BS, s % BS] = True
    assert torch.equal(moved, want)
    # only layer 2, both k and v of every kv head at those slots
    diff = (pool != c["pool"]).any(-1)   # [blocks, layers, 2, heads, bs]
    for s in c["slots"].tolist():
        if s >= 0:
            assert diff[s // BS, 2, :, :, s % BS].all() and not diff[s // BS, :2].any()


def test_fused_all_padding_and_empty_batch():
    n_q, n_kv, d = 9, 3, 64
    c = _case([0, 0], n_q, n_kv, d, torch.float32)
    out, pool = _fused(c, 0, n_q, n_kv, d)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(pool, c["pool"])
    e = {k: (v[:0] if k in ("q", "k", "v", "cos", "sin", "slots", "ctx") else v) for k, v in c.items()}
    out, pool = _fused(e, 0, n_q, n_kv, d)
    assert out.shape == (0, n_q, d) and torch.equal(pool, c["pool"])


def test_model_fast_decode_matches_eager():
    """A tiny Llama through ModelRunner: decode steps on the fused kernel vs the torch path."""
    from disagg_mpi.engine.model_runner import ModelRunner, StepPlan
    from disagg_mpi.engine.scheduler import StepInputs
    from disagg_mpi.engine.sequence import SamplingParams
    from disagg_mpi.model import load_model

    prompts = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 12, 13], list(range(40, 61))]
    bs, steps = 4, 6

    def run(fast):
        model = load_model("random:tiny", seed=3).to(DEVICE)
        runner = ModelRunner(model, 32, bs, DEVICE, fast_decode=fast, cuda_graphs=False)
        assert runner.fast_decode == fast
        tables, nxt = [], 0
        for p in prompts:
            nb = -(-(len(p) + steps) // bs)
            tables.append(list(range(nxt + nb - 1, nxt - 1, -1)))   # reversed block ids
            nxt += nb
        width = max(len(t) for t in tables)
        tables = [t + [-1] * (width - len(t)) for t in tables]
        seqs = [list(p) for p in prompts]
        # prefill (torch attention either way), then decode steps
        ids = [t for p in seqs for t in p]
        pos = [i for p in seqs for i in range(len(p))]
        slots = [tables[j][i // bs] * bs + i % bs for j, p in enumerate(seqs) for i in range(len(p))]
        qsl = [0]
        for p in seqs:
            qsl.append(qsl[-1] + len(p))
        n = len(seqs)
        greedy = [SamplingParams(temperature=0.0, seed=0)] * n
        inp = StepInputs(ids, pos, slots, qsl, [len(p) for p in seqs], tables,
                         [qsl[j + 1] - 1 for j in range(n)], list(range(n)))
        toks = runner.execute(StepPlan(inp, greedy, [(0, 0)] * n)).tokens
        for _ in range(steps):
            for p, t in zip(seqs, toks):
                p.append(t)
            pos = [len(p) - 1 for p in seqs]
            slots = [tables[j][q // bs] * bs + q % bs for j, q in enumerate(pos)]
            inp = StepInputs([p[-1] for p in seqs], pos, slots, list(range(n + 1)),
                             [len(p) for p in seqs], tables, list(range(n)), list(range(n)))
            toks = runner.execute(StepPlan(inp, greedy, [(0, 0)] * n)).tokens
        return seqs, runner.kv_pool

    ref, ref_pool = run(False)
    got, pool = run(True)
    assert got == ref
    torch.testing.assert_close(pool, ref_pool, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_q,n_kv,d", [(8, 2, 64), (32, 8, 128)])
def test_decodes_of_a_mixed_step_read_the_pool_in_place(n_q, n_kv, d):
    """The decode rows of a prefill step take the paged kernel (no padded gather, no per-shape
    SDPA plan): the same output as the gather + masked SDPA path, rows picked out of a wider step."""
    from disagg_mpi.model.attention import DecodeRows, _decode_over

    ctxs = [37, 5, 90]
    c = _case(ctxs, n_q, n_kv, d, torch.float32, seed=3)
    b, width = len(ctxs), int(c["table_stride"][0])
    tables = c["tables"].view(b, width)
    step_q = torch.randn(b + 4, n_q, d, device=DEVICE)            # a prefill's rows around them
    rows = torch.tensor([4, 1, 6], device=DEVICE)
    nb = -(-max(ctxs) // BS)
    dr = DecodeRows(rows, tables[:, :nb], c["ctx"], nb)
    got = dr.attend(step_q, c["pool"], 1, BS)
    want = _decode_over(step_q[rows], c["pool"], 1, tables, c["ctx"], nb, BS)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_rmsnorm_equals_a_norm_per_head(dtype):
    """Qwen3's q and k norms in one kernel, read from one qkv output's strided views: each head's
    row exactly as add_rmsnorm normalizes it alone."""
    n, n_q, n_kv, d = 3, 4, 2, 24   # (d not a power of two: masked tail)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, (n_q + 2 * n_kv) * d, generator=g).to(dtype).to(DEVICE)
    q, k, _ = qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1)
    wq, wk = (torch.rand(d, generator=g) + 0.5).to(dtype).to(DEVICE), torch.rand(d, generator=g).to(dtype).to(DEVICE)
    qo, ko = tk.qk_rmsnorm(q, k, wq, wk, 1e-6, d)
    assert qo.shape == (n, n_q * d) and ko.shape == (n, n_kv * d) and qo.is_contiguous()
    want_q = tk.add_rmsnorm(q.reshape(-1, d).contiguous(), None, wq, 1e-6)[1].view(n, -1)
    want_k = tk.add_rmsnorm(k.reshape(-1, d).contiguous(), None, wk, 1e-6)[1].view(n, -1)
    assert torch.equal(qo, want_q) and torch.equal(ko, want_k)
    with pytest.raises(ValueError, match="whole heads"):
        tk.qk_rmsnorm(q[:, :-1], k, wq, wk, 1e-6, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rope_and_kv_write_equal_the_torch_path(dtype):
    """A prefill or mixed step's RoPE + KV write in one kernel (Attention.forward on CUDA): roped
    q and k as the torch path computes them, k and v stored at the slots, padding skipped."""
    from disagg_mpi.model.attention import StepIndex, write_kv
    from disagg_mpi.model.context import AttentionMetadata
    from disagg_mpi.model.llama import rotate_half

    n_q, n_kv, d = 4, 2, 32
    c = _case([5, 0, 17, 9], n_q, n_kv, d, dtype)   # ctx 0: a padding row (slot -1)
    n = c["q"].shape[0]
    pool = c["pool"].clone()
    q, k, v = tk.rope_write_kv_all(c["q"], c["k"], c["v"], c["cos"], c["sin"], pool, 1, c["slots"], n_q, n_kv, d)
    assert v.is_contiguous() and torch.equal(v, c["v"].reshape(n, n_kv, d))
    rq = c["q"].reshape(n, n_q, d)
    rk = c["k"].reshape(n, n_kv, d)
    want_q = rq * c["cos"] + rotate_half(rq) * c["sin"]
    want_k = rk * c["cos"] + rotate_half(rk) * c["sin"]
    # within a rounding of the products: on CUDA fp32 contracts to FMAs (1e-7 apart), and in bf16 a
    # product a rounding apart shows in full where q * cos and rotate_half(q) * sin nearly cancel
    # (the interpreter's casts to bf16 truncate, too)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2 ** -6, "atol": 0.05}
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)
    ref = c["pool"].clone()
    meta = AttentionMetadata(slot_mapping=c["slots"].cpu(), query_start_loc=list(range(n + 1)),
                             context_lens=[5, 1, 17, 9], block_tables=c["tables"].view(n, -1), block_size=BS)
    write_kv(ref, 1, want_k, c["v"].reshape(n, n_kv, d), StepIndex.build(meta, torch.device(DEVICE)))
    torch.testing.assert_close(pool, ref, **tol)
    assert torch.equal(pool[:, 0], c["pool"][:, 0])   # the other layer untouched
