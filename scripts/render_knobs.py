#!/usr/bin/env python
"""Rewrite the generated knob tables of a docs page: `python scripts/render_knobs.py docs/transfer.md`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg_mpi.api import CacheTransceiverConfig
from disagg_mpi.knobs import with_docs_section

page = Path(sys.argv[1])
page.write_text(with_docs_section(page.read_text(), CacheTransceiverConfig))
