"""Module dependencies of the ssni package, and the check that its layers only point down.

    python tools/layers.py            # every module and the ssni modules it imports
    python tools/layers.py --check    # layer order and import cycles; exit 1 on a violation

Every import counts, also one inside a function (that is where cycles used to hide).
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1] / "toolkit" / "ssni"

# Lowest first. A module may import modules of its own layer or of lower ones, never higher.
LAYERS: List[Tuple[str, Set[str]]] = [
    ("core", {"registry", "io", "config", "device", "seeding", "diffusion", "images", "noise",
              "typical", "checkpoint", "sampling", "plotting", "help", "dist"}),
    ("data", {"data"}),
    ("models", {"models"}),
    ("purify / scoring", {"purify", "scoring"}),
    ("defense", {"defense"}),
    ("attacks", {"attacks"}),
    ("evaluate / training / denoise", {"evaluate", "training", "denoise"}),
    ("commands", {"commands"}),
    ("cli", {"cli"}),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    """toolkit/ssni/a/b.py -> ssni.a.b (a package's __init__.py -> the package)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: Set[str], root: Path = ROOT) -> Set[str]:
    """The ssni modules that the file at `path` imports (anywhere in it)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` imports the module ssni....x
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "ssni" or m.startswith("ssni.")} - {name}


def graph(root: Path = ROOT) -> Dict[str, Set[str]]:
    """{module: the ssni modules it imports} for every module of the package."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, modules, root) for f in files}


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a module (the package's own __init__ is above every layer; None: none)."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    for i, (_, names) in enumerate(LAYERS):
        if parts[1] in names:
            return i
    return None


def upward_imports(g: Dict[str, Set[str]]) -> List[str]:
    """'a -> b' for every import of a higher layer (and every module in no layer)."""
    out = [f"{m} is in no layer (add it to LAYERS in tools/layers.py)"
           for m in sorted(g) if layer_of(m) is None]
    for mod, deps in sorted(g.items()):
        if layer_of(mod) is None:
            continue
        for dep in sorted(deps):
            if dep != "ssni" and layer_of(dep) is None:
                continue
            if dep != "ssni" and layer_of(dep) > layer_of(mod):
                out.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) -> {dep} "
                           f"({LAYERS[layer_of(dep)][0]})")
            elif dep == "ssni" and mod != "ssni":
                out.append(f"{mod} -> ssni (the package imports everything: import a module)")
    return out


def cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
    """Import cycles between modules (one per strongly connected component of size > 1)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    comps: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return comps


def package_cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
    """Cycles between top-level parts (ssni.x), a package counting as one node."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    pg: Dict[str, Set[str]] = {}
    for mod, deps in g.items():
        if mod == "ssni":
            continue
        pg.setdefault(top(mod), set()).update(top(d) for d in deps if d != "ssni" and top(d) != top(mod))
    return cycles(pg)


def main(argv=None) -> int:
    """Print the dependency list, or check the layers (--check)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="check layers and cycles; exit 1 on a violation")
    ap.add_argument("--root", default=str(ROOT), help="the ssni package directory")
    args = ap.parse_args(argv)
    g = graph(Path(args.root))
    if not args.check:
        for mod, deps in sorted(g.items()):
            print(f"{mod}: {', '.join(sorted(deps))}")
        return 0
    bad = upward_imports(g)
    cyc = cycles(g) + package_cycles(g)
    for line in bad:
        print(f"upward import: {line}")
    for c in cyc:
        print(f"import cycle: {' <-> '.join(c)}")
    print(f"{len(g)} modules, {len(bad)} upward imports, {len(cyc)} cycles")
    return 1 if bad or cyc else 0


if __name__ == "__main__":
    sys.exit(main())
