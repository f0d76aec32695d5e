"""Measure the layering of a tree: imports across role boundaries, contracts, TLS spellings.

Usage: ``python scripts/layers.py [--json] [--root DIR]``. ``--root`` measures another
checkout (e.g. a ``git worktree`` of an older commit) with *this* tree's contracts, so the
figures before and after a change are comparable.

Every figure is read from the code:

* import counts: an AST walk of every module of the ``edgefl`` package (the folders are
  mapped by ``package-dir`` in the tree's ``pyproject.toml``), function-level imports
  included. A count is the number of distinct (importing module, imported module) pairs.
  The two composition roots (``edgefl.cli`` and ``edgefl.server.fl.simulation``, see the
  README's Architecture section) stand outside the rule, so their imports are listed in
  the table but not counted.
* ``contracts_kept`` / ``contracts_broken``: import-linter's verdict (``lint-imports``)
  on a link tree that mirrors the installed package. Modules a contract names that do
  not exist in the measured tree are dropped from it, so an older tree can be measured.
* ``tls_key_spellings``: distinct names of fields that hold TLS material (a ``Path`` field
  whose name mentions cert, key or ca, directories excluded) in pydantic config models,
  i.e. classes deriving from ``StrictModel`` directly or through other config models.
  Key files that are not TLS material are named in ``NOT_TLS`` with the reason.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
# edgefl.demo drives every role's processes and reads the server's registry: a role package
# above the shared layer (like the simulation), so core importing it is counted.
ROLES = (
    "edgefl.server",
    "edgefl.edge_agent",
    "edgefl.quantize",
    "edgefl.simulations",
    "edgefl.demo",
)
COMPOSITION_ROOTS = frozenset({"edgefl.cli", "edgefl.server.fl.simulation"})
_TLS_NAME = re.compile(r"cert|key|(^|_)ca(_|$)")
NOT_TLS: dict[str, str] = {
    "auth_key_file": "Flower's node-authentication key (the SuperNode signs its requests "
    "with it; the SuperLink checks them against the admitted public keys): not a TLS key",
}


def _package_dirs(root: Path) -> dict[str, Path]:
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    return {pkg: root / folder for pkg, folder in mapping.items()}


def modules(root: Path) -> dict[str, Path]:
    """Every module of the ``edgefl`` package in ``root``: dotted name -> file."""
    dirs = _package_dirs(root)
    out: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            # A sub-folder mapped to its own package is walked under that package's name.
            if pkg == "edgefl" and f"edgefl.{parts[0]}" in dirs:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imports(root: Path) -> set[tuple[str, str]]:
    """(importer, imported) pairs inside ``edgefl``, function-level imports included."""
    mods = modules(root)
    pairs: set[tuple[str, str]] = set()
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = name.split(".")
                    parent = parent if is_pkg else parent[:-1]
                    parent = parent[: len(parent) - (node.level - 1)]
                    base = ".".join([*parent, base] if base else parent)
                # `from pkg import mod` names a module when mod is one.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            pairs.update((name, t) for t in targets if _in(t, "edgefl"))
    return pairs


def _core_module(module: str) -> bool:
    """In the shared layer: a core module (not a role package) or the wire formats."""
    if _in(module, "edgefl.proto"):
        return True
    return not any(_in(module, role) for role in ROLES) and module not in COMPOSITION_ROOTS


def import_counts(root: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The three boundary counts and the composition roots' own crossing imports."""
    pairs = imports(root)
    above = (*ROLES, "edgefl.cli")
    counts = {
        "server_imports_edge_agent": 0,
        "edge_agent_imports_server": 0,
        "core_imports_above": 0,
    }
    roots: list[tuple[str, str]] = []
    for src, dst in sorted(pairs):
        if src in COMPOSITION_ROOTS:
            own = next((r for r in ROLES if _in(src, r)), None)
            if any(_in(dst, r) for r in ROLES if r != own):
                roots.append((src, dst))
            continue
        if _in(src, "edgefl.server") and _in(dst, "edgefl.edge_agent"):
            counts["server_imports_edge_agent"] += 1
        elif _in(src, "edgefl.edge_agent") and _in(dst, "edgefl.server"):
            counts["edge_agent_imports_server"] += 1
        elif _core_module(src) and any(_in(dst, a) for a in above):
            counts["core_imports_above"] += 1
    return counts, roots


def tls_spellings(root: Path) -> dict[str, list[str]]:
    """Config model -> its TLS-material field names."""
    classes: dict[str, tuple[ast.ClassDef, str]] = {}
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (node, name)
    models = {"StrictModel"}
    grew = True
    while grew:
        grew = False
        for cls, (node, _) in classes.items():
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            if cls not in models and bases & models:
                models.add(cls)
                grew = True
    out: dict[str, list[str]] = {}
    for cls in sorted(models & classes.keys()):
        node, module = classes[cls]
        fields = [
            s.target.id
            for s in node.body
            if isinstance(s, ast.AnnAssign)
            and isinstance(s.target, ast.Name)
            and "Path" in ast.unparse(s.annotation)
            and _TLS_NAME.search(s.target.id)
            and not s.target.id.endswith("_dir")
            and s.target.id not in NOT_TLS
        ]
        if fields:
            out[f"{module}.{cls}"] = fields
    return out


def _link_tree(root: Path, dest: Path) -> None:
    dirs = _package_dirs(root)
    top = dest / "edgefl"
    top.mkdir(parents=True)
    for entry in dirs["edgefl"].iterdir():
        if entry.name != "__pycache__" and f"edgefl.{entry.name}" not in dirs:
            (top / entry.name).symlink_to(entry)
    for pkg, folder in dirs.items():
        if pkg != "edgefl":
            link = dest.joinpath(*pkg.split("."))
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(folder)


def contracts(root: Path) -> dict[str, Any]:
    """import-linter's verdict on ``root`` under this tree's contracts."""
    config = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["importlinter"]
    known = modules(root)

    def exists(module: str) -> bool:
        return module in known

    kept: list[dict[str, Any]] = []
    for contract in config["contracts"]:
        c = dict(contract)
        for key in ("source_modules", "forbidden_modules", "modules"):
            if key in c:
                c[key] = [m for m in c[key] if exists(m)]
        if "ignore_imports" in c:
            c["ignore_imports"] = [
                i for i in c["ignore_imports"] if all(exists(m.strip()) for m in i.split("->"))
            ]
            c["unmatched_ignore_imports_alerting"] = "none"
        kept.append(c)
    with tempfile.TemporaryDirectory(prefix="edgefl-layers-") as tmp:
        tree = Path(tmp) / "tree"
        _link_tree(root, tree)
        cfg = Path(tmp) / ".importlinter"
        lines = ["[importlinter]", f"root_package = {config['root_package']}", ""]
        for c in kept:
            lines.append(f"[importlinter:contract:{c['id']}]")
            for key, value in c.items():
                if key == "id":
                    continue
                if isinstance(value, list):
                    value = "\n    " + "\n    ".join(value) if value else ""
                lines.append(f"{key} = {value}")
            lines.append("")
        cfg.write_text("\n".join(lines))
        lint = Path(sys.executable).with_name("lint-imports")
        proc = subprocess.run(
            [str(lint), "--config", str(cfg), "--no-cache"],
            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
    match = re.search(r"Contracts: (\d+) kept, (\d+) broken", proc.stdout)
    if match is None:
        raise SystemExit(f"lint-imports gave no verdict:\n{proc.stdout}\n{proc.stderr}")
    verdicts = re.findall(r"^(.+?) (KEPT|BROKEN)", proc.stdout, re.M)
    return {"kept": int(match[1]), "broken": int(match[2]), "verdicts": verdicts}


def main() -> None:
    """Print the figures as JSON (``--json``) or as a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the output contract")
    parser.add_argument("--root", type=Path, default=HERE, help="the tree to measure")
    args = parser.parse_args()
    root: Path = args.root.resolve()
    counts, roots = import_counts(root)
    verdict = contracts(root)
    tls = tls_spellings(root)
    spellings = sorted({f for fields in tls.values() for f in fields})
    result = {
        "contracts_kept": verdict["kept"],
        "contracts_broken": verdict["broken"],
        **counts,
        "tls_key_spellings": len(spellings),
    }
    if args.json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"layers of {root}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, str(value))
    console.print(table)
    contracts_table = Table(title="contracts (import-linter)")
    contracts_table.add_column("contract")
    contracts_table.add_column("verdict")
    for name, state in verdict["verdicts"]:
        contracts_table.add_row(name, state)
    console.print(contracts_table)
    roots_table = Table(title="composition roots' crossing imports (outside the rule)")
    roots_table.add_column("importer")
    roots_table.add_column("imported")
    for src, dst in roots:
        roots_table.add_row(src, dst)
    console.print(roots_table)
    tls_table = Table(title="TLS fields in config models")
    tls_table.add_column("model")
    tls_table.add_column("fields")
    for model, fields in tls.items():
        tls_table.add_row(model, ", ".join(fields))
    console.print(tls_table)


if __name__ == "__main__":
    main()
