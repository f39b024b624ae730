"""The two servers every test of this package asks: an aggregated one (mpiexec -n 2) and a
1 context + 1 generation one (mpiexec -n 3), which must answer token for token alike; started once
for the package (serve_server.launch), one after the other on a 2-core machine."""

from __future__ import annotations

import pytest

from tests.unit.serve_server import AGG_TOPOLOGY, TOPOLOGY, launch
from tests.unit.word_model import write_word_model

from . import sdk


@pytest.fixture(scope="package")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("openai")


@pytest.fixture(scope="package")
def folder(workdir):
    sdk.MODEL = str(write_word_model(workdir / "words"))
    return sdk.MODEL


@pytest.fixture(scope="package")
def agg(workdir, folder):
    with launch(workdir, "agg", AGG_TOPOLOGY.replace('"random:tiny"', f'"{folder}"'), 2) as srv:
        yield sdk.client_for(srv)


@pytest.fixture(scope="package")
def disagg(workdir, folder, agg):  # after agg: the two start one after the other on a 2-core machine
    with launch(workdir, "disagg", TOPOLOGY.replace('"random:tiny"', f'"{folder}"'), 3) as srv:
        yield sdk.client_for(srv)


@pytest.fixture(scope="package")
def clients(agg, disagg):
    return {"agg": agg, "disagg": disagg}


@pytest.fixture(scope="package")
def reference(agg):
    """Greedy text and tokens of each prompt, without stop strings (aggregated)."""
    out = []
    for p in sdk.PROMPTS:
        c = sdk.complete(agg, p).choices[0]
        out.append((c.text, sdk.ids_of(c)))
    return out
