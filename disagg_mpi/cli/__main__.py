"""`python -m disagg_mpi.cli` (how `disagg-mpi` starts its ranks under mpiexec)."""

from . import main

main()
