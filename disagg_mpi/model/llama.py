"""Llama-family decoder (Llama, SmolLM2, Qwen2 q/k/v bias, Qwen3 q/k norm) over a paged KV pool.

One module per rank: it holds only its TP slice of heads/MLP columns and its
PP range of layers. Parameter names mirror HF LlamaForCausalLM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disagg_mpi.model import cpu_gemm
from disagg_mpi.model import triton_kernels as tk
from disagg_mpi.model.attention import StepIndex, paged_attention, write_kv
from disagg_mpi.model.config import ModelConfig, rope_inv_freq
from disagg_mpi.model.context import get_forward_context
from disagg_mpi.model.moe import SparseMoE
from disagg_mpi.model.moe_grouped import grouped_mm_ok
from disagg_mpi.model.parallel import (
    ShardSpec,
    check_gqa_consistent,
    kv_head_range,
    q_head_range,
    validate_split,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 then cast back before the scale, as HF does (matters in bf16).
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, n_q: int, n_kv: int, shard: ShardSpec):
        super().__init__()
        d, hid, bias = cfg.head_dim, cfg.hidden_size, cfg.attention_bias
        self.n_q, self.n_kv, self.d, self.shard = n_q, n_kv, d, shard
        self.window = cfg.sliding_window
        self.q_proj = nn.Linear(hid, n_q * d, bias=bias)
        self.k_proj = nn.Linear(hid, n_kv * d, bias=bias)
        self.v_proj = nn.Linear(hid, n_kv * d, bias=bias)
        self.o_proj = nn.Linear(n_q * d, hid, bias=False)   # bias-free: TP partial sums are exact
        if cfg.qk_norm:   # Qwen3: RMSNorm over each head's head_dim, before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, pool, local_layer, idx):
        n = x.shape[0]
        q, k, v = self._qkv(x)
        if tk.available(x.device) and idx.slots is not None and tk.p2(self.d) == self.d:
            # CUDA: q/k norms, RoPE and the KV write in two Triton kernels (a prefill or mixed step
            # is bound by the host's launches: about 30 a layer, a dozen of them these)
            if hasattr(self, "q_norm"):
                q, k = tk.qk_rmsnorm(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.d)
            q, k, v = tk.rope_write_kv_all(q, k, v, cos, sin, pool, local_layer, idx.slots, self.n_q, self.n_kv,
                                           self.d)
        else:
            q = q.reshape(n, self.n_q, self.d)
            k = k.reshape(n, self.n_kv, self.d)
            v = v.reshape(n, self.n_kv, self.d)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            write_kv(pool, local_layer, k, v, idx)
        o = paged_attention(q, k, v, pool, local_layer, idx, self.window)
        o = o.reshape(n, self.n_q * self.d)
        packed = getattr(self, "_o_packed", None)
        o = cpu_gemm.linear(o, packed, None) if packed is not None else self.o_proj(o)
        if self.shard.tp_size > 1:
            o = self.shard.all_reduce(o)
        return o

    def fuse(self) -> None:
        """One [q; k; v] weight; the three Parameters become views into it (no extra memory)."""
        ws = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        self._qkv_w = _fuse_rows(ws)
        bs = [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]
        self._qkv_b = _fuse_rows(bs) if bs[0] is not None else None

    def pack(self) -> None:
        """CPU: q/k/v as one prepacked oneDNN GEMM, o_proj prepacked too (cpu_gemm.py); the dense
        weights are freed. Quantized projections (quant.py) are left as they are."""
        if not hasattr(self, "qkv_proj"):   # (quant.py deletes q/k/v_proj when it fuses them)
            mods = [self.q_proj, self.k_proj, self.v_proj]
            if all(type(m) is nn.Linear for m in mods):
                self._qkv_packed = cpu_gemm.pack_linears(mods)
        if type(self.o_proj) is nn.Linear:
            self._o_packed = cpu_gemm.pack_linears([self.o_proj])[0]

    def _qkv(self, x):
        packed = getattr(self, "_qkv_packed", None)
        if packed is not None:
            y = cpu_gemm.linear(x, *packed)
            return y.split([self.n_q * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
        qkv = getattr(self, "qkv_proj", None)   # quant.py's fused int8/int4 projection (CPU)
        if qkv is not None:
            return qkv(x).split([self.n_q * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
        w = getattr(self, "_qkv_w", None)
        if w is not None and self.q_proj.weight.data_ptr() == w.data_ptr():
            y = F.linear(x, w, self._qkv_b)
            return y.split([self.n_q * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward_fast(self, x, cos, sin, pool, local_layer, idx):
        """Decode-only step on the Triton kernels (no host work: graph-capturable)."""
        if self.window is not None:   # supports_fast_decode() keeps the runner off this path
            raise NotImplementedError("sliding-window attention is not implemented in the Triton decode "
                                      "kernel")
        n = x.shape[0]
        q, k, v = self._qkv(x)
        if hasattr(self, "q_norm"):
            # Qwen3's q/k norms come before RoPE, and the kernel below ropes: normalize here, both
            # in one Triton kernel that reads the strided views (torch's RMSNorm took six kernels a
            # norm in every layer of a launch-bound step); q and k come out contiguous, as the
            # kernel below takes them.
            q, k = tk.qk_rmsnorm(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.d)
        # RoPE, KV write and paged attention in one kernel (was rope_write_kv + paged_decode_attention)
        o = tk.rope_write_decode_attention(q, k, v, cos, sin, pool, local_layer, idx.slots, idx.tables,
                                           idx.table_stride, idx.ctx, self.n_q, self.n_kv, self.d)
        o = self.o_proj(o.view(n, self.n_q * self.d))
        if self.shard.tp_size > 1:
            o = self.shard.all_reduce(o)
        return o


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_local: int, shard: ShardSpec):
        super().__init__()
        self.shard = shard
        self.gate_proj = nn.Linear(cfg.hidden_size, ffn_local, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, ffn_local, bias=False)
        self.down_proj = nn.Linear(ffn_local, cfg.hidden_size, bias=False)

    def pack(self) -> None:
        """CPU: gate/up as one prepacked oneDNN GEMM, down_proj prepacked (cpu_gemm.py); the dense
        weights are freed. Quantized projections (quant.py) are left as they are."""
        if not hasattr(self, "gate_up_proj") and all(type(m) is nn.Linear for m in (self.gate_proj, self.up_proj)):
            self._gu_packed = cpu_gemm.pack_linears([self.gate_proj, self.up_proj])[0]
        if type(self.down_proj) is nn.Linear:
            self._down_packed = cpu_gemm.pack_linears([self.down_proj])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu, down = getattr(self, "_gu_packed", None), getattr(self, "_down_packed", None)
        gate_up = getattr(self, "gate_up_proj", None)   # quant.py's fused int8/int4 projection (CPU)
        if gu is not None:
            g, u = cpu_gemm.linear(x, gu, None).chunk(2, dim=-1)
            h = F.silu(g) * u
            y = cpu_gemm.linear(h, down, None) if down is not None else self.down_proj(h)
        elif gate_up is not None:
            g, u = gate_up(x).chunk(2, dim=-1)
            y = self.down_proj(F.silu(g) * u)
        else:
            y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.shard.tp_size > 1:
            y = self.shard.all_reduce(y)
        return y

    def fuse(self) -> None:
        self._gu_w = _fuse_rows([self.gate_proj.weight, self.up_proj.weight])

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, "_gu_w", None)
        if w is not None and self.gate_proj.weight.data_ptr() == w.data_ptr():
            g, u = F.linear(x, w).chunk(2, dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        y = self.down_proj(tk.silu_mul(g, u))
        if self.shard.tp_size > 1:
            y = self.shard.all_reduce(y)
        return y


def _fuse_rows(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenate along dim 0 and rebind each Parameter's data to its slice of the result."""
    fused = torch.cat([p.data for p in params], dim=0)
    start = 0
    for p in params:
        rows = p.shape[0]
        p.data = fused[start:start + rows]
        start += rows
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, n_q: int, n_kv: int, ffn_local: int, shard: ShardSpec,
                 expert_ffn_local: int | None = None, expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, n_q, n_kv, shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (SparseMoE(cfg, expert_ffn_local, shard, expert_range) if expert_ffn_local is not None
                    else MLP(cfg, ffn_local, shard))

    def forward(self, h, cos, sin, pool, local_layer, idx):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, pool, local_layer, idx)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Body(nn.Module):
    """Holds embed_tokens / layers / norm so names read `model.layers.N...` like HF."""


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, shard: ShardSpec | None = None):
        super().__init__()
        shard = shard or ShardSpec()
        cfg, tp = config, shard.tp_size
        validate_split(cfg, tp, 1, ep=shard.ep_size)
        check_gqa_consistent(shard.tp_rank, tp, cfg.num_heads, cfg.num_kv_heads)
        if tp > 1 and shard.all_reduce is None:
            raise ValueError("ShardSpec.all_reduce is required when tp_size > 1")
        self.config, self.shard = cfg, shard
        self.layer_start = shard.layer_start
        self.layer_end = shard.resolved_layer_end(cfg.num_layers)
        if not 0 <= self.layer_start < self.layer_end <= cfg.num_layers:
            raise ValueError(f"bad layer range [{self.layer_start}, {self.layer_end}) for "
                             f"{cfg.num_layers} layers")
        self.is_first = self.layer_start == 0
        self.is_last = self.layer_end == cfg.num_layers
        self.q_heads = q_head_range(shard.tp_rank, tp, cfg.num_heads)
        self.kv_heads = kv_head_range(shard.tp_rank, tp, cfg.num_kv_heads)
        ffn = cfg.intermediate_size // tp
        self.ffn_range = (shard.tp_rank * ffn, (shard.tp_rank + 1) * ffn)
        self.expert_range = shard.expert_range(cfg.num_experts)   # all of them unless EP
        self.expert_ffn_range = shard.expert_ffn_range(cfg.moe_intermediate_size)
        eff = self.expert_ffn_range[1] - self.expert_ffn_range[0]
        sff = cfg.shared_expert_intermediate_size // tp
        self.shared_ffn_range = (shard.tp_rank * sff, (shard.tp_rank + 1) * sff)
        n_q = self.q_heads[1] - self.q_heads[0]
        n_kv = self.kv_heads[1] - self.kv_heads[0]
        self.num_local_layers = self.layer_end - self.layer_start
        self.num_local_kv_heads = n_kv

        self.model = _Body()
        if self.is_first:
            self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleDict({
            str(i): DecoderLayer(cfg, n_q, n_kv, ffn, shard, eff if cfg.is_moe_layer(i) else None,
                                 self.expert_range)
            for i in range(self.layer_start, self.layer_end)})
        if self.is_last:
            self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq: torch.Tensor | None = None
        self._rope_table: torch.Tensor | None = None  # fast path: cos/sin of every position

    @classmethod
    def empty(cls, config: ModelConfig, shard: ShardSpec | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LlamaModel:
        """Uninitialized parameters allocated on `device` (no CPU init of big matrices)."""
        with torch.device("meta"):
            m = cls(config, shard)
        m = m.to(dtype=dtype).to_empty(device=device)
        m.tie_weights()   # to_empty makes a new Parameter per module, undoing the tie
        return m

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.is_first and self.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def allocate_kv_pool(self, num_blocks: int, block_size: int,
                         device: str | torch.device | None = None) -> torch.Tensor:
        return torch.zeros(num_blocks, self.num_local_layers, 2, self.num_local_kv_heads,
                           block_size, self.config.head_dim, dtype=self.dtype,
                           device=device if device is not None else self.device)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        if getattr(self, "_fast_kernels", False):
            return self._rope_rows(positions, dtype)
        return self._rope_eager(positions, dtype)

    def _rope_rows(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin rows gathered from a table of every position: one kernel per step instead of
        seven (a captured SmolLM2 decode step is launch-bound). The table is made by the same
        formula as `_rope_eager`, once, on the first fast step (before any graph capture)."""
        t = self._rope_table
        if t is None or t.device != positions.device or t.dtype != dtype:
            every = torch.arange(self.config.max_position_embeddings, device=positions.device)
            t = self._rope_table = torch.stack(self._rope_eager(every, dtype))   # [2, max_pos, 1, d]
        cs = t[:, positions]
        return cs[0], cs[1]

    def _rope_eager(self, positions: torch.Tensor, dtype: torch.dtype):
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.config, positions.device)
        freqs = positions.float()[:, None] * self._inv_freq[None, :]   # fp32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                kv_pool: torch.Tensor, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        meta = get_forward_context()
        if self.is_first:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            h = self.model.embed_tokens(input_ids.to(self.device))
        else:
            if hidden_states is None:
                raise ValueError("a later pipeline stage needs hidden_states")
            h = hidden_states.to(device=self.device, dtype=self.dtype)
        cos, sin = self._rope(positions.to(h.device), h.dtype)
        idx = StepIndex.build(meta, kv_pool.device)
        if idx.fast or getattr(self, "_fast_kernels", False):
            return self._forward_fast(h, cos, sin, kv_pool, idx)
        for i, layer in enumerate(self.model.layers.values()):
            h = layer(h, cos, sin, kv_pool, i, idx)
        if self.is_last:
            h = self.model.norm(h)
        return h

    def supports_fast_decode(self) -> bool:
        """The Triton decode kernels handle this model: power-of-two head_dim, full attention
        (their decode kernel has no sliding window: such a model runs the torch attention), and dense
        or MoE with the grouped expert GEMMs on this device and dtype (the expert loop reads routing
        on the host: no CUDA graph)."""
        d = self.config.head_dim
        cfg = self.config
        moe_ok = cfg.num_experts == 0 or grouped_mm_ok(self.device, self.dtype)
        return d >= 16 and d & (d - 1) == 0 and cfg.sliding_window is None and moe_ok

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up weights into one GEMM each for the fast decode path.

        The original Parameters become views into the fused tensors (state_dict and
        names unchanged, no extra memory). Replacing a Parameter later just turns the
        fusion off for that module.
        """
        for layer in self.model.layers.values():
            layer.self_attn.fuse()
            layer.mlp.fuse()

    @torch.no_grad()
    def pack_for_cpu(self) -> None:
        """Prepack the dense layers' projections for oneDNN (cpu_gemm.py) and run the lm_head through
        oneDNN too (dense: it is tied to the embedding). The dense projection weights are freed, so the
        model then only runs its forward; MoE layers keep their own path."""
        for layer in self.model.layers.values():
            layer.self_attn.pack()
            if isinstance(layer.mlp, MLP):
                layer.mlp.pack()
        if self.is_last and type(self.lm_head) is nn.Linear:
            self._onednn_lm_head = True

    def _forward_fast(self, h, cos, sin, kv_pool, idx):
        """Forward on the Triton kernels (residual add fused into each RMSNorm, SwiGLU, fused
        GEMMs). Decode-only steps (idx.fast) also use the Triton RoPE/KV write and paged
        attention; other steps keep torch's attention (SDPA) after the Triton RoPE + KV write
        (Attention.forward). Used on CUDA once a ModelRunner turned `_fast_kernels` on
        (DISAGG_CUDA_GRAPHS=0 keeps it off)."""
        layers = list(self.model.layers.values())
        first = layers[0].input_layernorm
        resid, x = tk.add_rmsnorm(h, None, first.weight, first.eps)
        for i, layer in enumerate(layers):
            if idx.fast:
                a = layer.self_attn.forward_fast(x, cos, sin, kv_pool, i, idx)
            else:   # prefill / mixed step: torch attention, fused norms and MLP around it
                a = layer.self_attn(x, cos, sin, kv_pool, i, idx)
            ln = layer.post_attention_layernorm
            resid, x = tk.add_rmsnorm(resid, a, ln.weight, ln.eps)
            m = layer.mlp.forward_fast(x)
            if i + 1 < len(layers):
                ln = layers[i + 1].input_layernorm
                resid, x = tk.add_rmsnorm(resid, m, ln.weight, ln.eps)
        if self.is_last:
            return tk.add_rmsnorm(resid, m, self.model.norm.weight, self.model.norm.eps)[1]
        return resid + m

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.is_last:
            raise RuntimeError("compute_logits is only available on the last pipeline stage")
        if getattr(self, "_onednn_lm_head", False):
            return cpu_gemm.dense_linear(hidden, self.lm_head.weight).float()
        return self.lm_head(hidden).float()
