"""Model families other than Llama under mpiexec: a Qwen3 checkpoint (written by transformers)
served disaggregated with a different TP on each side, token for token equal to transformers.

Job sizes used here: world(4).
"""

from __future__ import annotations

import pytest

from disagg_mpi import Request, launch
from tests.hf_folder import family_checkpoint
from tests.mpi.test_parallel import _disagg_topology

pytestmark = pytest.mark.mpi(min_size=2)

PROMPTS = [[5, 17, 300, 42, 7, 99, 100, 3, 250], [11, 12, 13], list(range(20, 60)), [7] * 23]
NEW = 10


@pytest.mark.world(4)
def test_qwen3_tp2_context_to_tp1_generation_equals_transformers():
    folder = family_checkpoint("qwen3")    # every rank asks; one builds it, the others wait
    with launch(_disagg_topology(str(folder), (2, 1), (1, 1))) as orch:
        if orch is None:
            return
        from tests.oracle import hf_greedy

        outs = orch.generate([Request(p, max_tokens=NEW, ignore_eos=True) for p in PROMPTS], timeout=600)
        assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
        assert [o.result.output_token_ids for o in outs] == hf_greedy(PROMPTS, NEW, folder, None)
        assert all(o.result.metrics.kv_transfer_bytes > 0 for o in outs)
        orch.wait_pools_full()
