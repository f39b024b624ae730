"""Multi-rank tests: run under `mpiexec -n N python -m mpi4py -m pytest --with-mpi tests/mpi`.

A test marked `world(n)` runs only in a job of exactly n ranks (it is skipped
in the others), so `scripts/run_tests.py` runs this folder once per size.
`python -m mpi4py` makes an exception on one rank abort the whole job
instead of leaving the other ranks waiting in a collective.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        from mpi4py import MPI
    except ImportError:  # pragma: no cover - mpi4py is a dependency
        return
    size = MPI.COMM_WORLD.Get_size()
    for item in items:
        mark = item.get_closest_marker("world")
        if mark is not None and mark.args[0] != size:
            item.add_marker(pytest.mark.skip(reason=f"needs exactly {mark.args[0]} MPI ranks, job has {size}"))


def pytest_configure(config):
    # One JUnit report per job, from rank 0 (the other ranks would overwrite it).
    try:
        from mpi4py import MPI
    except ImportError:  # pragma: no cover
        return
    if MPI.COMM_WORLD.Get_rank() != 0 and getattr(config.option, "xmlpath", None):
        config.option.xmlpath = None
