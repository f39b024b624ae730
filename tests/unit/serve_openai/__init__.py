"""The official `openai` SDK against `disagg-mpi serve` (a package, so that conftest.py's two servers
start once for its test files and stop when they are done)."""
