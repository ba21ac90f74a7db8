"""Who may import whom, read from the source with `ast` (every import, module-level or inside a function):
the trainer, the quantum pool and the control plane meet in services/contract and never import each other;
qpeft_core imports no services; no gradient code (`.backward(`) lives under services/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module the file imports, relative imports resolved; `from a import b` counts as a and a.b."""
    package = list(path.relative_to(root).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def offenders(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> dict[str, list[str]]:
    """Files under `folder` that import a module in (or under) `forbidden`, with what they import."""
    out = {}
    for path in sorted((root / folder).rglob("*.py")):
        bad = sorted(m for m in imports(path, root) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            out[str(path.relative_to(root))] = bad
    return out


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "services" / "trainer"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "import services.control_plane.db\n"
        "from ..quantum_pool import pool\n"
        "from . import run\n"
        "def f():\n    from services.contract.ledger import InMemoryLedger\n"
    )
    assert imports(pkg / "x.py", tmp_path) >= {
        "services.control_plane.db",
        "services.quantum_pool.pool",
        "services.trainer.run",
        "services.contract.ledger.InMemoryLedger",
    }
    found = offenders("services/trainer", ("services.control_plane", "services.quantum_pool"), tmp_path)
    assert found == {
        "services/trainer/x.py": ["services.control_plane.db", "services.quantum_pool", "services.quantum_pool.pool"]
    }


def test_control_plane_imports_neither_trainer_nor_pool():
    assert offenders("services/control_plane", ("services.trainer", "services.quantum_pool")) == {}


def test_trainer_and_pool_never_import_the_control_plane():
    assert offenders("services/trainer", ("services.control_plane",)) == {}
    assert offenders("services/quantum_pool", ("services.control_plane", "services.trainer")) == {}


def test_the_contract_imports_none_of_the_services_it_connects():
    services = ("services.control_plane", "services.trainer", "services.quantum_pool", "services.cli")
    assert offenders("services/contract", services + ("services.demo", "fastapi", "ray")) == {}


def test_qpeft_core_imports_no_services():
    assert offenders("qpeft_core", ("services",)) == {}


def test_no_backward_call_under_services():
    calls = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "services").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward"
    ]
    assert calls == []
