#!/usr/bin/env bash
# One device call's worth of GPU work: `scripts/gpu_session.sh STAGE...` on the GPU machine.
#
# The machine has torch, mpi4py and Open MPI but not every dependency: wheels carried in
# .whl/ (pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions, gguf,
# pytest-mpi, msgpack, llguidance (abi3); `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl ...`) are installed to /tmp/site first. The stages'
# output goes to $OUT/session_$TAG.log and their JSON beside it, in $OUT (or ./out): few files,
# as the device tool brings back at most 8. A stage that overruns its limit is stopped without
# stopping the others. Stages:
#   env        the card, driver, torch, MPI
#   tests      tests/gpu on 3 ranks (one GPU), then the Triton kernel tests of tests/unit on the GPU
#   agg-chunk  the aggregated 8B server under the serving load, prefill_chunk_tokens each of CHUNKS (256 512),
#              REPS (1) fresh servers each
#   mixed      scripts/probe_mixed.py: 8B, a CHUNK-token (512) prefill chunk beside 16 decodes: step wall
#              times, kernel time and the host's busiest ops under torch.profiler
#   moe-tiles  scripts/probe_moe.py: one MoE layer's routed experts, fused kernels' tiles vs grouped GEMMs
#   moe-ab     random:qwen3-30b-a3b, this engine only, batches MOE_BATCHES (1,4): grouped GEMMs vs fused kernels
#   grammar-tests  tests/gpu/test_gpu_grammar.py, test_gpu_logprobs.py, test_decode_graphs.py,
#              test_moe_gpu.py and the fused MoE kernels' tests alone, without MPI
#   signals    the stop-signal tests under Open MPI's mpirun (tests/unit/test_rank_failure.py)
#   transfer   scripts/bench_transfer.py --device cuda, every backend, JSON + PNG
#   probe      scripts/probe_ring.py: where a staged ring pull spends its time
#   probe-ipc  scripts/probe_ring.py --ipc: the same for a one-sided CUDA IPC pull
#   limits     scripts/probe_limits.py: this GPU's ceilings (staged pipeline, decode kernel tiles,
#              decode GEMMs, a batch-64 decode profile; PARTS= picks some; PROFILE_MODEL, PROFILE_BATCHES,
#              PROFILE_PROMPT and PROFILE_NEW (1: a prefill profile) shape the profile)
#   hook-ab    the `serving` load four times on fresh servers, DISAGG_HANDOFF_DURING_STEPS off, on, off, on
#   cross      scripts/probe_limits.py --parts cross: one rank's D2H with the other's H2D, one GPU
#   engine     scripts/bench_engine.py, 8B bf16 vs transformers, 512-token prompts, 128 new tokens
#   engine128  the same with 128-token prompts and 64 new tokens
#   smollm2    scripts/bench_engine.py, single-stream decode of a SmolLM2-shaped model
#   ttft       scripts/bench_ttft.py, 2,048-token prompts, disaggregated vs aggregated
#   engine-quick  scripts/bench_engine.py, 8B bf16, this engine only (batch 1 and 64, best of 3): the
#              figure to compare two versions of the code on one machine
#   qwen3      the same for the random:qwen3-8b preset (q/k norm); QWEN3_BATCHES picks the batches
#   grammar    scripts/bench_grammar.py, 8B, batch 16: logprobs and a JSON schema vs plain decoding (issue 21);
#              the machine has no network: GRAMMAR_TOKENIZER=out/tok/smollm2 (a HF folder of SmolLM2's
#              tokenizer files, carried) instead of fetching the default GGUF
#   control    scripts/bench_control.py: control-plane round trips (3 ranks) and the codec
#   graphs-serve  the aggregated 8B server at 8 req/s, decode graphs captured lazily vs at start-up
#              (serve-lazy, serve-startup, and their second runs serve-lazy2, serve-startup2: one each;
#              COLD=1 gives each server an empty Triton cache)
#   shapes     scripts/bench_engine.py (this engine, batch 1 and 64) on the Llama-family shapes besides
#              the 8B preset (SHAPES= picks presets); one JSON for all: shapes_$TAG.json
#   (still to run, as of the thirteenth session: `tests` (the Triton test of the prefill RoPE kernel
#    was relaxed to one rounding after its GPU run), `moe` (batch 64 against transformers on this code),
#    and `serving` / `agg-chunk` more than once on one machine for issue 23's ITL p99, with `mixed`
#    beside them: the host's speed varied 2.4x within one call; then the same with
#    DISAGG_PREFILL_TRITON_ATTN=1, the one-kernel prompt attention, never run on a GPU yet)
#   serving    the issue-23 load (1,024-token prompts, 128 new tokens, Poisson at RATES=8 req/s) on a
#              fresh aggregated and a fresh 1 ctx + 1 gen 8B server, empty Triton cache, with
#              DISAGG_STEP_LOG: serving_$TAG.tgz holds the bench's folder and the step logs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:scripts${PYTHONPATH:+:$PYTHONPATH}
MPIRUN="mpirun --allow-run-as-root --oversubscribe --bind-to none"
TAG=${TAG:-$(date +%H%M)}

stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1
    echo "=== $name: rc $? in $((SECONDS - t0)) s"
}

exec > >(tee -a "$OUT/session_$TAG.log") 2>&1
serve_bench() {  # serve_bench NAME: the aggregated 8B server under Poisson load, results.json only
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    # COLD=1: every server starts with an empty Triton cache, as on a new machine (else kernels
    # compiled by an earlier run are reused)
    if [ "${COLD:-0}" = 1 ]; then export TRITON_CACHE_DIR=$(mktemp -d); fi
    stage "serve-$1" 150 python3 -m disagg_mpi.cli bench --config configs/llama8b-1gpu-agg.yaml --label "$1" \
        --num-requests 64 --input-len 512 --output-len 128 --request-rate 8 --warmup 4 --no-plots \
        --no-progress --out "/tmp/serve-$1"
    cp "/tmp/serve-$1/results.json" "$OUT/serve_${1}_$TAG.json"
}

for s in "$@"; do
    case $s in
    env)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
        python3 -c 'import torch, mpi4py; from mpi4py import MPI; print(torch.__version__, torch.cuda.get_device_name(), MPI.Get_library_version().splitlines()[0])'; python3 -c 'import matplotlib, aiohttp, triton; print("matplotlib", matplotlib.__version__, "triton", triton.__version__)'
        ;;
    tests)
        stage tests 420 $MPIRUN -n 3 python3 -m mpi4py -m pytest --with-mpi -q -x -p no:cacheprovider tests/gpu
        stage triton-tests 180 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_decode.py \
            tests/unit/test_triton_moe.py tests/unit/test_triton_prefill.py ;;
    grammar-tests)  # the guided-decoding, logprobs and decode-graph tests alone (no MPI): a quick check of a change there
        stage grammar-tests 180 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_grammar.py \
            tests/gpu/test_gpu_logprobs.py tests/gpu/test_decode_graphs.py tests/unit/test_triton_moe.py \
            tests/gpu/test_moe_gpu.py ;;
    signals)  # stop signals through Open MPI's mpirun (it kills the job on a SIGTERM of its own)
        stage signals 180 env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 python3 -m pytest -q \
            -p no:cacheprovider tests/unit/test_signals.py tests/unit/test_rank_failure.py ;;
    transfer)
        stage transfer 240 $MPIRUN -n 2 python3 -m mpi4py scripts/bench_transfer.py --device cuda \
            --json "$OUT/transfer_$TAG.json" --png "$OUT/transfer_$TAG.png" ;;
    probe)
        stage probe 150 $MPIRUN -n 2 python3 -m mpi4py scripts/probe_ring.py --sizes 4M 16M 64M 256M \
            --slots 8 16 --ramp --json "$OUT/probe_$TAG.json" ;;
    probe-ipc)
        stage probe-ipc 120 $MPIRUN -n 2 python3 -m mpi4py scripts/probe_ring.py --ipc --sizes 1M 16M 64M 256M \
            --json "$OUT/probe_ipc_$TAG.json" ;;
    limits)
        stage limits 300 python3 scripts/probe_limits.py --parts ${PARTS:-staged attn gemm profile} \
            --profile-model "${PROFILE_MODEL:-random:llama-3.1-8b}" --profile-batches "${PROFILE_BATCHES:-64}" \
            --profile-prompt "${PROFILE_PROMPT:-512}" --profile-new-tokens "${PROFILE_NEW:-32}" \
            --json "$OUT/limits_$TAG.json" ;;
    cross)
        stage cross 120 $MPIRUN -n 2 python3 -m mpi4py scripts/probe_limits.py --parts cross \
            --json "$OUT/cross_$TAG.json" ;;
    engine)
        stage engine 300 python3 scripts/bench_engine.py --device cuda --prompt-len 512 --new-tokens 128 \
            --compare-overlap --json "$OUT/engine_p512_$TAG.json" ;;
    engine128)
        stage engine128 300 python3 scripts/bench_engine.py --device cuda --compare-overlap \
            --json "$OUT/engine_p128_$TAG.json" ;;
    smollm2)
        stage smollm2 120 python3 scripts/bench_engine.py --device cuda --model random:smollm2 --batches 1 \
            --skip-hf --repeats 10 --new-tokens 256 --compare-overlap --json "$OUT/engine_smollm2_$TAG.json" ;;
    engine-quick)
        stage engine-quick 200 python3 scripts/bench_engine.py --device cuda --batches 1,64 --skip-hf --repeats 3 \
            --json "$OUT/engine_quick_$TAG.json" ;;
    qwen3)
        stage qwen3 200 python3 scripts/bench_engine.py --device cuda --model random:qwen3-8b \
            --batches "${QWEN3_BATCHES:-1,64}" --skip-hf --repeats 3 --json "$OUT/engine_qwen3_$TAG.json" ;;
    shapes)
        for m in ${SHAPES:-llama-3.2-1b llama-3.2-3b llama-2-7b qwen2.5-7b qwen2.5-14b qwen2.5-0.5b}; do
            stage "shape-$m" 200 python3 scripts/bench_engine.py --device cuda --model "random:$m" \
                --batches 1,64 --skip-hf --repeats 2 --json "/tmp/shape_$m.json"
        done
        python3 -c 'import json, sys, glob; json.dump({p.split("shape_")[1][:-5]: json.load(open(p)) for p in sorted(glob.glob("/tmp/shape_*.json"))}, open(sys.argv[1], "w"), indent=1)' \
            "$OUT/shapes_$TAG.json" ;;
    serving)
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        rm -rf /tmp/serving && mkdir -p /tmp/serving
        TRITON_CACHE_DIR=$(mktemp -d) DISAGG_STEP_LOG=/tmp/serving/steps \
            stage serving 420 python3 -m disagg_mpi.cli bench --config configs/llama8b-1gpu-agg.yaml \
            --config configs/llama8b-1gpu-1ctx-1gen.yaml --label agg --label disagg --num-requests 64 \
            --input-len 1024 --output-len 128 --request-rate "${RATES:-8}" --warmup 4 --no-progress \
            --slo-ttft-ms 500 --slo-tpot-ms 15 --out /tmp/serving/bench
        tar czf "$OUT/serving_$TAG.tgz" -C /tmp serving ;;
    hook-ab)  # DISAGG_HANDOFF_DURING_STEPS off/on/off/on, aggregated and 1 ctx + 1 gen, the serving load
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        for run in off1 on1 off2 on2; do
            [ "${run%?}" = on ] && export DISAGG_HANDOFF_DURING_STEPS=1 || export DISAGG_HANDOFF_DURING_STEPS=0
            TRITON_CACHE_DIR=$(mktemp -d) stage "hook-$run" 150 python3 -m disagg_mpi.cli bench \
                --config configs/llama8b-1gpu-agg.yaml --config configs/llama8b-1gpu-1ctx-1gen.yaml \
                --label agg --label disagg --num-requests 64 --input-len 1024 --output-len 128 --request-rate 8 \
                --warmup 4 --no-progress --no-plots --slo-ttft-ms 500 --slo-tpot-ms 15 --out "/tmp/hook-$run"
            cp "/tmp/hook-$run/results.json" "$OUT/hook_${run}_$TAG.json"
        done
        unset DISAGG_HANDOFF_DURING_STEPS ;;
    moe)
        stage moe 300 python3 scripts/bench_engine.py --device cuda --model random:qwen3-30b-a3b --batches 1,64 \
            --repeats 2 --json "$OUT/engine_moe_$TAG.json" ;;
    agg-chunk)  # the aggregated server under the serving load with prefill_chunk_tokens = each of CHUNKS,
        # REPS fresh servers each (the ITL p99 of one run moved 2.6-3.3x between machines)
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        for c in ${CHUNKS:-256 512}; do
            sed "s/prefill_chunk_tokens: [0-9]*/prefill_chunk_tokens: $c/" configs/llama8b-1gpu-agg.yaml >"/tmp/agg$c.yaml"
            for r in $(seq "${REPS:-1}"); do
                TRITON_CACHE_DIR=$(mktemp -d) stage "agg-chunk$c-$r" 150 python3 -m disagg_mpi.cli bench \
                    --config "/tmp/agg$c.yaml" --label "agg-chunk$c" --num-requests 64 --input-len 1024 \
                    --output-len 128 --request-rate 8 --warmup 4 --no-progress --no-plots --slo-ttft-ms 500 \
                    --slo-tpot-ms 15 --out "/tmp/agg-chunk$c-$r"
                cp "/tmp/agg-chunk$c-$r/results.json" "$OUT/agg_chunk${c}_${r}_$TAG.json"
            done
        done ;;
    mixed)  # a prefill chunk beside running decodes: wall vs kernels, the host's busiest ops (issue 23)
        stage mixed 200 python3 scripts/probe_mixed.py --chunk "${CHUNK:-512}" --json "$OUT/mixed_$TAG.json" ;;
    moe-tiles)  # the fused MoE kernels' tiles vs the grouped GEMMs, one layer alone (scripts/probe_moe.py)
        stage moe-tiles 120 python3 scripts/probe_moe.py --json "$OUT/moe_tiles_$TAG.json" ;;
    moe-ab)  # MoE decode at small batches: the grouped GEMMs (DISAGG_MOE_FUSED=0) vs the fused kernels
        for f in 0 1; do
            DISAGG_MOE_FUSED=$f stage "moe-fused$f" 200 python3 scripts/bench_engine.py --device cuda \
                --model random:qwen3-30b-a3b --batches "${MOE_BATCHES:-1,4}" --skip-hf --repeats 3 \
                --json "$OUT/engine_moe_fused${f}_$TAG.json"
        done ;;
    grammar)
        stage grammar 240 python3 scripts/bench_grammar.py --device cuda --model random:llama-3.1-8b \
            --tokenizer "${GRAMMAR_TOKENIZER:-smollm2}" --batch 16 --max-tokens 128 --rounds 3 --json "$OUT/grammar_$TAG.json" ;;
    control)
        stage control 120 $MPIRUN -n 3 python3 -m mpi4py scripts/bench_control.py --json "$OUT/control_$TAG.json"
        stage codec 60 python3 scripts/bench_control.py --codec --json "$OUT/codec_$TAG.json" ;;
    ttft)
        stage ttft 180 $MPIRUN -n 3 python3 -m mpi4py scripts/bench_ttft.py --device cuda --json "$OUT/ttft_$TAG.json" ;;
    graphs-serve)  # decode graphs captured lazily vs at start-up, same load
        DISAGG_GRAPH_CAPTURE=lazy serve_bench lazy
        serve_bench startup ;;
    serve-lazy|serve-lazy2)
        DISAGG_GRAPH_CAPTURE=lazy serve_bench "${s#serve-}" ;;
    serve-startup|serve-startup2)
        serve_bench "${s#serve-}" ;;
    *)
        echo "unknown stage $s" >&2 ;;
    esac
done
