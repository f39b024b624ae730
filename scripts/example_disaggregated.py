"""The seed's disaggregated-serving example, in Python.

Run with:  mpiexec -n 3 python -m mpi4py scripts/example_disaggregated.py [CONFIG]

Every rank runs this file. `launch()` splits the world by the YAML topology:
rank 0 gets the orchestrator, ranks 1.. run their executors until rank 0
leaves the `with` block (they get None and skip the body).
"""

import sys

from disagg_mpi import ContextPhaseParams, Request, launch
from disagg_mpi.model.tokenizer import load_tokenizer

config = sys.argv[1] if len(sys.argv) > 1 else "configs/smollm2-1ctx-1gen.yaml"

with launch(config) as orchestrator:
    if orchestrator:
        tok = load_tokenizer(orchestrator.topo.model.path)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tok.encode(tok.apply_chat_template(question, add_generation_prompt=True))
        request = Request(input_token_ids=ids, max_tokens=16)

        # 1. Context phase: the router picks a context executor; it prefills,
        #    samples the first token and keeps the KV blocks.
        [gid] = orchestrator.enqueue_context([request])
        [(gid, ctx_response)] = orchestrator.await_context_responses()
        params: ContextPhaseParams = ctx_response.result.context_phase_params
        print(f"context phase done on executor {ctx_response.result.metrics.executor}: "
              f"first token {params.first_gen_tokens}")

        # 2. Generation phase: the same request plus the context's params; the
        #    generation executor pulls the KV from the context ranks and decodes.
        request.context_phase_params = params
        orchestrator.enqueue_generation([request], [gid])
        tokens = []
        while True:
            [(gid, gen_response)] = orchestrator.await_generation_responses()
            tokens = gen_response.result.output_token_ids
            if gen_response.is_final:
                break
        print(f"generation phase on executor {gen_response.result.metrics.executor}, "
              f"KV moved in {gen_response.result.metrics.kv_transfer_ms:.1f} ms")
        print("answer:", tok.decode(tokens))
