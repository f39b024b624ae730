"""Pure logic of the decode fast path: batch padding and the packed input layout (CPU)."""
import numpy as np
import pytest
import torch

from disagg_mpi.engine.cuda_graphs import (
    capture_at_startup,
    capture_sizes,
    fast_path_enabled,
    is_decode_only,
    pack_decode,
    packed_len,
    padded_size,
    unpack_views,
)
from disagg_mpi.engine.scheduler import StepInputs


def test_padded_size():
    assert [padded_size(b) for b in (1, 2, 3, 5, 8, 9, 64, 65, 128)] == [1, 2, 4, 8, 8, 16, 64, 128, 128]
    assert padded_size(129) is None
    assert padded_size(3, (2, 6)) == 6


def test_capture_sizes_reach_a_full_batch():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 8]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert capture_sizes(500) == [1, 2, 4, 8, 16, 32, 64, 128]   # larger batches run eagerly
    assert capture_sizes(3, (2, 6, 10)) == [2, 6]


def test_graph_capture_mode(monkeypatch):
    monkeypatch.delenv("DISAGG_GRAPH_CAPTURE", raising=False)
    assert capture_at_startup()
    monkeypatch.setenv("DISAGG_GRAPH_CAPTURE", " Lazy ")
    assert not capture_at_startup()
    monkeypatch.setenv("DISAGG_GRAPH_CAPTURE", "sometimes")
    with pytest.raises(ValueError, match="allowed: startup, lazy"):
        capture_at_startup()


def test_pack_layout_and_padding():
    buf = np.full(200, 7, dtype=np.int64)
    n = pack_decode(buf, 4, [10, 11, 12], [5, 0, 20], [37, 80, 161], [6, 1, 21],
                    [[2, 3], [5], [9, 10]])
    w = 2
    assert n == packed_len(4, w) == 4 * 4 + 1 + 4 * w
    assert buf[0:4].tolist() == [10, 11, 12, 0]
    assert buf[4:8].tolist() == [5, 0, 20, 0]
    assert buf[8:12].tolist() == [37, 80, 161, -1]      # padding row: no KV write
    assert buf[12:16].tolist() == [6, 1, 21, 0]         # padding row: reads nothing
    assert buf[16] == w
    tables = buf[17:n].reshape(4, w)
    assert tables[0].tolist() == [2, 3] and tables[1, 0] == 5 and tables[2].tolist() == [9, 10]
    assert buf[n] == 7                                  # nothing written past the end

    dev = torch.from_numpy(buf.copy())
    ids, pos, meta = unpack_views(dev, 4, 16)
    assert ids.tolist() == [10, 11, 12, 0] and pos.tolist() == [5, 0, 20, 0]
    assert meta.slot_mapping.tolist() == [37, 80, 161, -1]
    assert meta.context_lens_t.tolist() == [6, 1, 21, 0]
    assert int(meta.table_stride[0]) == w
    assert meta.block_tables[:4 * w].view(4, w)[2].tolist() == [9, 10]
    assert meta.num_seqs == 4 and meta.is_decode_only


def test_pack_rejects_bad_input():
    buf = np.zeros(32, dtype=np.int64)
    with pytest.raises(ValueError):
        pack_decode(buf, 1, [1, 2], [0, 0], [0, 1], [1, 1], [[0], [0]])     # batch > rows
    with pytest.raises(ValueError):
        pack_decode(buf, 2, [1, 2], [0], [0, 1], [1, 1], [[0], [0]])        # ragged lists
    with pytest.raises(ValueError):
        pack_decode(buf, 4, [1], [0], [0], [1], [list(range(20))])          # buffer too small


def test_is_decode_only():
    dec = StepInputs([1, 2], [3, 4], [3, 4], [0, 1, 2], [4, 5], [[0], [0]], [0, 1], [1, 2])
    pre = StepInputs([1, 2, 3], [0, 1, 4], [0, 1, 4], [0, 2, 3], [2, 5], [[0], [0]], [1, 2], [1, 2])
    assert is_decode_only(dec) and not is_decode_only(pre)


def test_switch(monkeypatch):
    monkeypatch.setenv("DISAGG_CUDA_GRAPHS", "0")
    assert not fast_path_enabled()
    monkeypatch.setenv("DISAGG_CUDA_GRAPHS", "1")
    assert fast_path_enabled()


def test_cpu_runner_keeps_eager_path():
    from disagg_mpi.engine.model_runner import ModelRunner
    from disagg_mpi.model import load_model

    model = load_model("random:tiny")
    runner = ModelRunner(model, 8, 4, "cpu")
    assert not runner.fast_decode and runner.graphs is None
    assert not getattr(model, "_projections_fused", False)
