#!/usr/bin/env bash
# Explicit mpirun launcher: starts the world size the topology implies and runs
# `disagg-mpi run` (or any other disagg-mpi command) on every rank.
#
#   launch/mpirun.sh CONFIG [run|serve] [ARGS...]
#   launch/mpirun.sh configs/smollm2-1ctx-1gen.yaml run --input examples/prompts.jsonl --output out.jsonl
#
# Environment: MPIEXEC (default: the mpiexec beside python, then PATH),
# MPIEXEC_FLAGS (extra launcher flags, e.g. "--oversubscribe" for Open MPI).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [run|serve] [ARGS...]" >&2
  exit 2
fi
config=$1; shift
cmd=${1:-run}; [ $# -gt 0 ] && shift
python=${PYTHON:-python}
# Validate first, in one process: a bad topology, a missing model or a TP / layer_split the model
# cannot take fails here with one line and exit code 2, before any rank starts. This also fetches
# the default model once, before N ranks race for it. Its summary line names the world size.
summary=$("$python" -m disagg_mpi.cli validate --config "$config") || exit $?
echo "$summary" >&2
n=$(sed -n 's/^ok: world size \([0-9][0-9]*\) .*/\1/p' <<<"$summary")
bin=$(dirname "$(command -v "$python")")
mpiexec=${MPIEXEC:-$( [ -x "$bin/mpiexec" ] && echo "$bin/mpiexec" || command -v mpiexec )}
# `python -m mpi4py` turns an exception on one rank into an abort of the whole job.
exec "$mpiexec" ${MPIEXEC_FLAGS:-} -n "$n" "$python" -m mpi4py -m disagg_mpi.cli "$cmd" --config "$config" "$@"
