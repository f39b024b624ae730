#!/usr/bin/env python
"""Where a CPU executor's time goes: one in-process Executor (aggregated) runs N requests twice (the
first warms up), and the second run's thread CPU time is split by step kind (decode-only or
prefill/mixed) into GEMMs (decoder projections, lm_head), attention (its KV gather and SDPA calls),
KV writes, sampling, and what the engine spends outside the runner. One torch thread, so thread CPU
time is the work done whatever else the machine runs (wall time on the shared 2-core VM is not).

    OMP_NUM_THREADS=1 python scripts/profile_cpu_steps.py --n 32 --batch 32 --plen 257 --olen 64
    OMP_NUM_THREADS=1 DISAGG_CPU_PACKED_GEMM=0 python scripts/profile_cpu_steps.py --n 32 --batch 8

The timers wrap functions by monkeypatching (profiling only; never imported by the package).
"""
import argparse
import collections
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

torch.set_num_threads(1)
import torch.nn.functional as F

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request, SamplingConfig
from disagg_mpi.engine import model_runner as MR
from disagg_mpi.engine.executor import Executor
from disagg_mpi.model import attention as A
from disagg_mpi.model import llama as L

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8); p.add_argument("--mnt", type=int, default=1024)
p.add_argument("--n", type=int, default=16); p.add_argument("--plen", type=int, default=257)
p.add_argument("--olen", type=int, default=64); p.add_argument("--dtype", default="float32")
p.add_argument("--temp", type=float, default=0.0); p.add_argument("--chunk", type=int, default=None)
a = p.parse_args()
acc = collections.defaultdict(float); cnt = collections.Counter()
kind = ["?"]
def timed(name, fn):
    @functools.wraps(fn)
    def w(*args, **kw):
        t = time.thread_time()
        try: return fn(*args, **kw)
        finally:
            k = (kind[0], name); acc[k] += time.thread_time() - t; cnt[k] += 1
    return w
cfg = ExecutorConfig(max_batch_size=a.batch, max_num_tokens=a.mnt, prefill_chunk_tokens=a.chunk,
                     kv_cache_config=KvCacheConfig(block_size=16, num_blocks=max(256, a.batch * 23)), dtype=a.dtype)
ex = Executor("smollm2", cfg)
model = ex.model
# GEMMs: every nn.Linear forward (lm_head separately)
from torch import nn

orig_lin = nn.Linear.forward
def lin(self, x):
    t = time.thread_time()
    try: return orig_lin(self, x)
    finally:
        k = (kind[0], "gemm:lm_head" if self.out_features == model.config.vocab_size else "gemm:body"); acc[k] += time.thread_time() - t; cnt[k] += 1
orig_flin = F.linear
def flin(x, w, b=None):
    t = time.thread_time()
    try: return orig_flin(x, w, b)
    finally:
        k = (kind[0], "gemm:lm_head" if w.shape[0] == model.config.vocab_size else "gemm:body"); acc[k] += time.thread_time() - t; cnt[k] += 1
F.linear = flin
L.paged_attention = timed("attention", A.paged_attention)
L.write_kv = timed("write_kv", L.write_kv)
A.torch.index_select = timed("attn:index_select(gather)", torch.index_select)
A.F.scaled_dot_product_attention = timed("attn:sdpa", F.scaled_dot_product_attention)
from disagg_mpi.model import cpu_gemm as CG

CG.linear = timed("gemm:body(onednn)", CG.linear)
CG.dense_linear = timed("gemm:lm_head(onednn)", CG.dense_linear)
MR.sample_step = timed("sampling", MR.sample_step)
orig_exec = MR.ModelRunner.execute
def ex_wrap(self, plan):
    inp = plan.inputs
    q = inp.query_start_loc
    kind[0] = "decode" if all(q[i+1]-q[i] == 1 for i in range(len(q)-1)) else "prefill/mixed"
    t = time.thread_time()
    try: return orig_exec(self, plan)
    finally:
        acc[(kind[0], "runner.execute total")] += time.thread_time() - t; cnt[(kind[0], "runner.execute total")] += 1
MR.ModelRunner.execute = ex_wrap
orig_fwd = L.LlamaModel.forward
def fwd(self, *args, **kw):
    t = time.thread_time()
    try: return orig_fwd(self, *args, **kw)
    finally: acc[(kind[0], "model.forward total")] += time.thread_time() - t
L.LlamaModel.forward = fwd
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(1000, 49152, (a.plen,), generator=g).tolist() for _ in range(a.n)]
def run():
    sc = SamplingConfig(temperature=a.temp, seed=7) if a.temp else SamplingConfig()
    return ex.generate([Request(list(p), max_tokens=a.olen, ignore_eos=True, sampling_config=sc) for p in prompts])
run(); acc.clear(); cnt.clear()
t0 = time.perf_counter(); c0 = time.thread_time(); pc0 = time.process_time()
run()
wall = time.perf_counter() - t0; cpu = time.thread_time() - c0; pcpu = time.process_time() - pc0
print(f"batch {a.batch} mnt {a.mnt} chunk {a.chunk} n {a.n} plen {a.plen} olen {a.olen} dtype {a.dtype} temp {a.temp}")
print(f"wall {wall:.2f}s thread cpu {cpu:.2f}s process cpu {pcpu:.2f}s  -> out tok per cpu-s {a.n*a.olen/cpu:.1f} load {os.getloadavg()[0]:.1f}")
for k in sorted(acc, key=lambda k: (k[0], -acc[k])):
    print(f"  {k[0]:14s} {k[1]:24s} {acc[k]:8.3f}s  {100*acc[k]/cpu:5.1f}%  calls {cnt[k]}")
print(f"  engine/python outside runner.execute: {cpu - acc[('decode','runner.execute total')] - acc[('prefill/mixed','runner.execute total')]:.3f}s")
