"""The layers of ARCHITECTURE.md hold: formulas < library < datasets < commands < cli, and no
module imports a module that imports it back (directly or through others). Imports inside
functions count: a lazy import is still a dependency."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "percontrast"
FORMULAS = {"percontrast.pir", "percontrast.losses"}


def _name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """percontrast modules imported anywhere in the file (absolute or relative)."""
    mod = _name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("percontrast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("percontrast"):
                continue
            # "from . import x" / "from .datasets import email": x may be a submodule
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
    return {m for m in out if m != mod}


def _graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]
    mods = {_name(p): p for p in files}
    return {m: {i for i in _imports(p) if i in mods} for m, p in mods.items()}


def _layer(mod: str) -> int:
    if mod in FORMULAS:
        return 0
    if mod.startswith("percontrast.datasets"):
        return 2
    if mod.startswith("percontrast.commands"):
        return 3
    if mod in ("percontrast.cli", "percontrast._moved"):
        return 4
    return 1


def test_the_graph_is_not_empty():
    g = _graph()
    assert len(g) > 30 and g["percontrast.commands.train"] >= {"percontrast.options", "percontrast.trainer"}


def test_no_module_imports_a_higher_layer():
    bad = [(m, i) for m, deps in _graph().items() for i in deps
           if _layer(i) > _layer(m) and m != "percontrast"]   # the package __init__ only installs _moved
    assert not bad, bad


def test_formulas_import_nothing_from_the_package():
    g = _graph()
    assert not (g["percontrast.pir"] | g["percontrast.losses"])


def test_no_import_cycles():
    g = _graph()
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(g[m]):
            visit(d)
        stack.pop()

    for m in sorted(g):
        visit(m)
    assert not cycles, cycles[:5]
