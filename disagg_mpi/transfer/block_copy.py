"""Copy whole KV blocks between two pools on one GPU in a single pass (CUDA IPC pulls).

`copy_blocks(dst, dst_ids, src, src_ids)` sets dst[dst_ids[i]] = src[src_ids[i]]
along dim 0. Runs that are consecutive in both pools go as one `copy_` each;
when there are many runs (a fragmented pool), one Triton kernel moves every
block, reading and writing each byte once (an index_select + index_copy_ pair
would move it twice, through a temporary). Without Triton the pair is used.
"""

from __future__ import annotations

import itertools

import torch

from .chunks import device_ids, is_run, zero_copy_bounds

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl
except ImportError:
    triton = None

try:  # pragma: no cover - depends on the install (the IPC backend needs cupy anyway)
    from cupy.cuda.runtime import memcpyAsync as _memcpy_async
except ImportError:
    _memcpy_async = None

MAX_COPIES = 32  # more runs than this: one kernel for all of them (copy_ per run is faster on the GPU)
_CHUNK = 4096  # words per program
_WARPS = 4


if triton is not None:

    @triton.jit
    def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, words, CHUNK: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        m = offs < words
        s = tl.load(src_ids_ptr + b).to(tl.int64) * words
        d = tl.load(dst_ids_ptr + b).to(tl.int64) * words
        tl.store(dst_ptr + d + offs, tl.load(src_ptr + s + offs, mask=m), mask=m)


def _words(t: torch.Tensor) -> torch.Tensor:
    """The pool as [num_blocks, words]: the widest integer type dividing a block's bytes."""
    nbytes = t[0].numel() * t.element_size() if t.shape[0] else 0
    for dt, w in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if nbytes % w == 0:
            return t.view(t.shape[0], -1).view(dt) if t.element_size() <= w else t.view(t.shape[0], -1)
    return t.view(t.shape[0], -1).view(torch.uint8)


def copy_blocks(dst: torch.Tensor, dst_ids: list[int], src: torch.Tensor, src_ids: list[int],
                stream: torch.cuda.Stream | None = None) -> int:
    """dst[dst_ids[i]] = src[src_ids[i]] for contiguous pools of equal block shape; returns bytes moved.

    Queued on `stream` (default: the current stream); both pools must be on the same device
    (src may be a CUDA IPC mapping of another process's pool). With a CUDA stream given, runs
    go as raw cudaMemcpyAsync calls: a few microseconds each instead of a torch op's tens,
    which is most of a one-sided IPC pull's cost."""
    n = len(src_ids)
    if n == 0:
        return 0
    block = src.stride(0) * src.element_size()  # contiguous pools (checked below before raw copies)
    bounds = zero_copy_bounds(src_ids, dst_ids, n)
    contiguous = dst.is_contiguous() and src.is_contiguous()
    if stream is not None and contiguous and len(bounds) - 1 <= MAX_COPIES and _memcpy_async is not None:
        s, d, h = src.data_ptr(), dst.data_ptr(), stream.cuda_stream
        for lo, hi in itertools.pairwise(bounds):
            _memcpy_async(d + dst_ids[lo] * block, s + src_ids[lo] * block, (hi - lo) * block, 3, h)
        return n * block
    if stream is not None:
        with torch.cuda.stream(stream):
            return copy_blocks(dst, dst_ids, src, src_ids)
    if len(bounds) - 1 <= MAX_COPIES or not contiguous:
        for lo, hi in itertools.pairwise(bounds):
            dst.narrow(0, dst_ids[lo], hi - lo).copy_(src.narrow(0, src_ids[lo], hi - lo))
    else:
        dev = dst.device
        sidx, didx = device_ids(src_ids, dev), device_ids(dst_ids, dev)
        if triton is not None and (dev.type == "cuda" or _interpreting()):
            s, d = _words(src), _words(dst)
            words = s.shape[1]
            _copy_blocks_kernel[(n, triton.cdiv(words, _CHUNK))](s, d, sidx, didx, words, CHUNK=_CHUNK,
                                                                   num_warps=_WARPS)
        else:
            dst.index_copy_(0, didx, src.index_select(0, sidx))
    return n * block


class PoolPair:
    """Copies from one source pool (a CUDA IPC mapping) into ours on one stream, resolved once.

    Raw pointers and the block size are read when the pair is made, so a pull of blocks that
    are one run in both pools costs two id checks and one cudaMemcpyAsync: ~5 us less host
    time than `copy_blocks`' general path, on the critical path of every one-sided IPC pull."""

    def __init__(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream | None):
        self.dst, self.src, self.stream = dst, src, stream
        self.block = src.stride(0) * src.element_size()
        self.raw = (_memcpy_async is not None and dst.is_contiguous() and src.is_contiguous()
                    and dst.shape[1:] == src.shape[1:] and dst.dtype == src.dtype)
        self._d, self._s = dst.data_ptr(), src.data_ptr()
        self._h = stream.cuda_stream if stream is not None else 0

    def copy(self, dst_ids, src_ids, n: int) -> int:
        """dst[dst_ids[i]] = src[src_ids[i]] for i < n, queued on the stream; returns bytes."""
        if self.raw and n and is_run(src_ids, n) and is_run(dst_ids, n):
            b = self.block
            _memcpy_async(self._d + dst_ids[0] * b, self._s + src_ids[0] * b, n * b, 3, self._h)
            return n * b
        return copy_blocks(self.dst, list(dst_ids[:n]), self.src, list(src_ids[:n]), self.stream)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
