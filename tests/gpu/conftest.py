"""GPU tests: `mpirun -n 3 python -m mpi4py -m pytest --with-mpi tests/gpu` on a CUDA machine.

Everything here skips cleanly without CUDA (or without MPI). A test marked
`world(n)` runs only in a job of exactly n ranks.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        cuda = False
    try:
        from mpi4py import MPI
        size = MPI.COMM_WORLD.Get_size()
    except ImportError:  # pragma: no cover
        size = None
    for item in items:
        if not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)"))
            continue
        mark = item.get_closest_marker("world")
        if mark is not None and mark.args[0] != size:
            item.add_marker(pytest.mark.skip(reason=f"needs exactly {mark.args[0]} MPI ranks, job has {size}"))


def pytest_configure(config):
    config.addinivalue_line("markers", "world(n): runs only in an MPI job of exactly n ranks")
    try:
        from mpi4py import MPI
    except ImportError:  # pragma: no cover
        return
    if MPI.COMM_WORLD.Get_rank() != 0 and getattr(config.option, "xmlpath", None):
        config.option.xmlpath = None
