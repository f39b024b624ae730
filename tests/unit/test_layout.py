"""The package's shape (issue 19): no import circle among its modules, and no message dict keyed
by a literal "op" or "mode" string (every message between ranks is a record of protocol.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "disagg_mpi"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, f: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports (the most specific one per imported name)."""
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in mods and m != name}


def import_cycles(mods: dict[str, Path]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    edges = {n: _imports(n, f, mods) for n, f in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                cycles.append(sorted([v, *group]))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_circle():
    assert import_cycles(_modules()) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("from .a import y\n")
    (tmp_path / "c.py").write_text("from .a import y\n")
    mods = {f"p.{n}": tmp_path / f"{n}.py" for n in "abc"}
    assert import_cycles(mods) == [["p.a", "p.b"]]


def _op_dicts(src: str) -> list[int]:
    """Lines of dict literals with a literal "op" or "mode" key."""
    return [node.lineno for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Dict)
            and any(isinstance(k, ast.Constant) and k.value in ("op", "mode") for k in node.keys)]


def test_no_message_dicts_keyed_by_op_or_mode():
    found = {str(f.relative_to(PKG)): lines for f in PKG.rglob("*.py") if (lines := _op_dicts(f.read_text()))}
    assert found == {}
    assert _op_dicts('send({"op": "step", "plan": p})') == [1]  # the check sees one


# Each layer of DESIGN.md imports nothing from the layers above it.
_ABOVE = {
    "model": {"engine", "transfer", "runtime", "orchestrator", "serve", "cli", "bench", "spmd", "protocol"},
    "transfer": {"engine", "orchestrator", "serve", "cli", "bench", "spmd"},
    "engine": {"runtime", "orchestrator", "serve", "cli", "bench", "spmd"},
    "runtime": {"orchestrator", "serve", "cli", "bench", "spmd"},
    "orchestrator": {"serve", "cli", "bench", "spmd"},
}


def test_layers_import_nothing_from_above():
    mods = _modules()
    wrong = sorted((name, target) for name, f in mods.items() for target in _imports(name, f, mods)
                   if name.count(".") and target.count(".")
                   and target.split(".")[1] in _ABOVE.get(name.split(".")[1], ()))
    assert wrong == []


def test_no_submodule_shadows_a_public_name():
    """Importing a submodule sets it as an attribute of its package: a module named like one of the
    package's public (lazy) names would replace that name (`from disagg_mpi import launch` gave the
    module once `disagg_mpi/launch.py` existed)."""
    import disagg_mpi

    public = set(disagg_mpi.__all__) | {"Executor", "DisaggOrchestrator"}
    submodules = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if p.is_dir()}
    assert public & submodules == set()
