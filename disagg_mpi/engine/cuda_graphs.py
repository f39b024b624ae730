"""Decode steps on the device fast path: packed inputs (one host->device copy) and CUDA graphs.

A decode-only step (one new token per sequence) is described by five integer
arrays. They are packed into one flat int64 buffer, for a batch padded to `bp`
rows and a block-table width `w`:

    [0, bp)        input ids        (padding: 0)
    [bp, 2bp)      positions        (padding: 0)
    [2bp, 3bp)     slot mapping     (padding: -1, the KV write skips it)
    [3bp, 4bp)     context lengths  (padding: 0, attention reads nothing)
    [4bp]          w, the row stride of the tables (read on device by the kernel)
    [4bp+1, ...)   block tables, row-major [bp, w] (padding rows: not read)

so a step costs one copy of `4bp + 1 + bp*w` integers from pinned memory, and a
graph captured for `bp` rows reads views at fixed offsets whatever `w` is.

`DecodeGraphs` captures the model forward + logits per padded batch size
against those static views and the runner's fixed KV pool, and replays them.
An executor that decodes captures every size up to its `max_batch_size` at
start-up (`capture_sizes`): captured lazily, the first batch of a new size in
the middle of serving would stall every running request for the capture
(warm-up runs, Triton compiles, the capture itself). `DISAGG_GRAPH_CAPTURE=lazy`
keeps the lazy capture (a faster start). Only used on CUDA with one rank (no TP/PP: their
collectives run through MPI on the host) and unless `DISAGG_CUDA_GRAPHS=0`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..knobs import env_value
from ..model.attention import DecodeMetadata
from ..model.context import forward_context

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def fast_path_enabled() -> bool:
    """`DISAGG_CUDA_GRAPHS=0` turns off CUDA graphs and the Triton decode kernels."""
    return env_value("DISAGG_CUDA_GRAPHS")


def capture_at_startup() -> bool:
    """`DISAGG_GRAPH_CAPTURE=lazy` captures a batch size's graph on its first use instead."""
    return env_value("DISAGG_GRAPH_CAPTURE") == "startup"


def capture_sizes(max_batch_size: int, sizes: Sequence[int] = GRAPH_BATCH_SIZES) -> list[int]:
    """The padded batch sizes a scheduler of `max_batch_size` can reach: every capture size up to
    the one that holds a full batch (all of them when a full batch is larger than all)."""
    top = padded_size(max_batch_size, sizes)
    return [s for s in sorted(sizes) if top is None or s <= top]


def padded_size(b: int, sizes: Sequence[int] = GRAPH_BATCH_SIZES) -> int | None:
    """The smallest capture size >= b, or None when b is larger than all."""
    for s in sorted(sizes):
        if s >= b:
            return s
    return None


def packed_len(bp: int, width: int) -> int:
    return 4 * bp + 1 + bp * width


def pack_decode(buf: np.ndarray, bp: int, input_ids: Sequence[int], positions: Sequence[int],
                slot_mapping: Sequence[int], context_lens: Sequence[int],
                block_tables: Sequence[Sequence[int]]) -> int:
    """Fill buf (int64, long enough) with the layout above; returns the length used.

    `block_tables` rows may be ragged or -1 padded; each is copied as far as it goes.
    """
    b = len(input_ids)
    if not (len(positions) == len(slot_mapping) == len(context_lens) == len(block_tables) == b):
        raise ValueError("pack_decode: a decode step has one token, slot, length and table per sequence")
    if b > bp:
        raise ValueError(f"pack_decode: batch {b} does not fit {bp} rows")
    width = max(1, max((len(t) for t in block_tables), default=1))
    n = packed_len(bp, width)
    if n > buf.shape[0]:
        raise ValueError(f"pack_decode: needs {n} entries, buffer has {buf.shape[0]}")
    buf[0:b] = input_ids
    buf[b:bp] = 0
    buf[bp:bp + b] = positions
    buf[bp + b:2 * bp] = 0
    buf[2 * bp:2 * bp + b] = slot_mapping
    buf[2 * bp + b:3 * bp] = -1
    buf[3 * bp:3 * bp + b] = context_lens
    buf[3 * bp + b:4 * bp] = 0
    buf[4 * bp] = width
    tables = buf[4 * bp + 1:n].reshape(bp, width)
    if b and all(len(t) == width for t in block_tables):
        tables[:b] = block_tables
    else:
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = t
    return n


def unpack_views(dev: torch.Tensor, bp: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, DecodeMetadata]:
    """(input ids, positions, DecodeMetadata) as views of a packed device buffer for bp rows."""
    meta = DecodeMetadata(
        slot_mapping=dev[2 * bp:3 * bp],
        query_start_loc=list(range(bp + 1)),
        context_lens=[1] * bp,
        block_tables=dev[4 * bp + 1:],
        block_size=block_size,
        context_lens_t=dev[3 * bp:4 * bp],
        table_stride=dev[4 * bp:4 * bp + 1],
    )
    return dev[0:bp], dev[bp:2 * bp], meta


def is_decode_only(inp) -> bool:
    q = inp.query_start_loc
    # (a forked sequence samples a row it shares: more samples than rows is not a plain decode)
    return (len(inp.input_ids) == len(inp.context_lens) and q[-1] == len(q) - 1 and len(inp.input_ids) > 0
            and len(inp.sample_indices) <= len(inp.input_ids))


class DecodeInputs:
    """Two pinned host buffers, used in turn, and their device twin; one copy per step.

    Two, so that packing step N+1 never waits for step N's copy to leave the host
    (with overlapped decode that copy is queued behind step N-1)."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = capacity
        self.device = device
        pin = device.type == "cuda"
        self.hosts = [torch.zeros(capacity, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.dev = torch.zeros(capacity, dtype=torch.long, device=device)
        self._copied = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._turn = 0

    def fits(self, bp: int, width: int) -> bool:
        return packed_len(bp, width) <= self.capacity

    def upload(self, inp, bp: int) -> None:
        self.upload_arrays(bp, inp.input_ids, inp.positions, inp.slot_mapping, inp.context_lens,
                           inp.block_tables)

    def upload_arrays(self, bp: int, *arrays) -> None:
        turn, self._turn = self._turn, self._turn ^ 1
        host, copied = self.hosts[turn], self._copied[turn]
        if copied is not None:
            copied.synchronize()   # this buffer's previous copy has left the host
        n = pack_decode(host.numpy(), bp, *arrays)
        self.dev[:n].copy_(host[:n], non_blocking=True)
        if copied is not None:
            copied.record()


class Launch:
    """One queued decode step: views of the graph's outputs and its greedy tokens on their
    way to pinned host memory."""

    __slots__ = ("b", "event", "host", "logits", "tokens")

    def __init__(self, b, logits, tokens, host, event):
        self.b, self.logits, self.tokens, self.host, self.event = b, logits, tokens, host, event

    def wait(self, meanwhile: Callable[[], object] | None = None) -> list[int]:
        """The greedy tokens (the step's one host sync); `meanwhile` is called again and again
        while the GPU runs the step (a leader's hand-off messages: worker.py)."""
        if meanwhile is not None:
            while not self.event.query():
                meanwhile()
        self.event.synchronize()
        return self.host[:self.b].tolist()


class DecodeGraphs:
    """CUDA graphs of `model forward + compute_logits` for decode steps of padded batch sizes."""

    def __init__(self, model, kv_pool: torch.Tensor, block_size: int, max_width: int,
                 sizes: Sequence[int] = GRAPH_BATCH_SIZES):
        self.model = model
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.sizes = tuple(sorted(sizes))
        self.max_bs = self.sizes[-1]
        self.inputs = DecodeInputs(packed_len(self.max_bs, max_width), kv_pool.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays: dict[int, int] = {}  # padded batch size -> steps replayed (stats, tests)
        self.mempool = torch.cuda.graph_pool_handle()
        # Greedy tokens go to pinned host memory; two slots, as two steps may be queued.
        self._tokens = [torch.zeros(self.max_bs, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)]
        self._turn = 0
        # Tokens taken outside a graph (a grammar's masked argmax), fetched before the next launch
        self._fetched = torch.zeros(self.max_bs, dtype=torch.long, pin_memory=True)
        self._fetched_event = torch.cuda.Event()

    def can_run(self, inp) -> bool:
        bp = padded_size(len(inp.input_ids), self.sizes)
        if bp is None:
            return False
        width = max(1, max((len(t) for t in inp.block_tables), default=1))
        return self.inputs.fits(bp, width)

    def _forward(self, bp: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos, meta = unpack_views(self.inputs.dev, bp, self.block_size)
        with forward_context(meta):
            h = self.model(ids, pos, self.kv_pool)
            logits = self.model.compute_logits(h)
            return logits, logits.argmax(dim=-1)   # greedy tokens, as sample() computes them

    def capture(self, bp: int) -> None:
        # Static inputs of an all-padding batch: no KV write, no cache read.
        self.inputs.upload_arrays(bp, [], [], [], [], [])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):     # warm up (Triton compiles, cuBLAS picks) off the graph
            for _ in range(2):
                self._forward(bp)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self._forward(bp)
        self.graphs[bp] = (graph, out)

    def capture_all(self, sizes: Sequence[int]) -> int:
        """Capture the graphs of `sizes` not captured yet; returns how many were."""
        todo = [bp for bp in sizes if bp in self.sizes and bp not in self.graphs]
        for bp in todo:
            self.capture(bp)
        return len(todo)

    def launch(self, inp, ids_from: torch.Tensor | None = None) -> Launch:
        """Queue the step's graph; `ids_from` (a previous launch's `tokens`) gives the input ids
        on the device instead of `inp.input_ids`."""
        b = len(inp.input_ids)
        bp = padded_size(b, self.sizes)
        if bp not in self.graphs:
            self.capture(bp)
        self.inputs.upload(inp, bp)
        if ids_from is not None:
            self.inputs.dev[:b].copy_(ids_from[:b])
        graph, (logits, tokens) = self.graphs[bp]
        graph.replay()
        self.replays[bp] = self.replays.get(bp, 0) + 1
        turn, self._turn = self._turn, self._turn ^ 1
        host, event = self._tokens[turn], self._events[turn]
        host[:b].copy_(tokens[:b], non_blocking=True)
        event.record()
        return Launch(b, logits[:b], tokens[:b], host, event)

    def fetch(self, tokens: torch.Tensor) -> Launch:
        """`tokens` [b], computed on the device after a launch, queued now on their way to pinned
        host memory: their Launch.wait does not wait for a step launched after this call (a plain
        `.tolist()` would: it syncs the whole stream). Valid until the next fetch."""
        b = tokens.shape[0]
        self._fetched[:b].copy_(tokens, non_blocking=True)
        self._fetched_event.record()
        return Launch(b, None, tokens, self._fetched, self._fetched_event)

    def run(self, inp) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [b, vocab] float32, greedy tokens [b]) of the step's b sequences.

        Views of the graph's static outputs: valid until the next run."""
        launch = self.launch(inp)
        return launch.logits, launch.tokens
