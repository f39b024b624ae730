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
# Validate first: a bad topology fails here, before any rank starts.
n=$("$python" -c 'import sys; from disagg_mpi.config import load_topology; print(load_topology(sys.argv[1]).world_size)' "$config")
bin=$(dirname "$(command -v "$python")")
mpiexec=${MPIEXEC:-$( [ -x "$bin/mpiexec" ] && echo "$bin/mpiexec" || command -v mpiexec )}
# Fetch the default model once, before N ranks race for it.
"$python" -c 'import sys; from disagg_mpi.config import load_topology; from disagg_mpi.cli import _fetch_if_default; _fetch_if_default(load_topology(sys.argv[1]).model.path)' "$config"
# `python -m mpi4py` turns an exception on one rank into an abort of the whole job.
exec "$mpiexec" ${MPIEXEC_FLAGS:-} -n "$n" "$python" -m mpi4py -m disagg_mpi.cli "$cmd" --config "$config" "$@"
