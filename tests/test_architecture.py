"""The house reads top to bottom: imports point down (docs/design.md, "Dependencies point one way").

Every module under skipcache/ is parsed (nothing is imported) and its imports are checked against
the layers below. Imports inside functions and under `TYPE_CHECKING` count too: a lazy import is
still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "skipcache"

# Top down, as docs/design.md's module map lists them. A module may import modules of a layer below
# its own, or of its own layer when both are in one package (data/, synthworld/, bench/, baselines/); never above.
LAYERS = [
    ("shell", ["skipcache.__main__", "skipcache.cli"]),
    ("bench", ["skipcache.bench"]),
    ("pipeline", ["skipcache.pipeline"]),
    ("stages", ["skipcache.stages"]),
    ("rundir", ["skipcache.rundir"]),
    ("baselines", ["skipcache.baselines"]),
    ("step", ["skipcache.step"]),
    ("preprocess", ["skipcache.preprocess"]),
    ("loading", ["skipcache.loading"]),
    ("store", ["skipcache.store"]),
    ("store_check", ["skipcache.store_check"]),
    ("store_read", ["skipcache.store_read"]),
    ("store_layout", ["skipcache.store_layout"]),
    ("data", ["skipcache.data"]),
    ("synthworld", ["skipcache.synthworld"]),
    ("child", ["skipcache.child"]),
    ("cskip", ["skipcache.cskip"]),
    ("placement", ["skipcache.placement"]),
    ("model", ["skipcache.model"]),
    ("progress", ["skipcache.progress"]),
    ("runtime", ["skipcache.runtime"]),
    ("errors", ["skipcache.errors"]),
    ("package", ["skipcache"]),
][::-1]  # bottom first: a layer's index is its height
STAGES = "skipcache.stages"
ABOVE_STAGES = ("skipcache.stages", "skipcache.pipeline", "skipcache.cli", "skipcache.bench", "skipcache.__main__")
STORE_MODULES = {"skipcache.store", "skipcache.store_layout", "skipcache.store_read", "skipcache.store_check"}
# Private members of another module's objects that are still reached into; each is a debt, not a
# licence: (module, attribute).
KNOWN_PRIVATE_ACCESS: set[tuple[str, str]] = set()  # (module, attribute) pairs allowed to cross; none today


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_modules(root: Path = PACKAGE) -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(root.rglob("*.py"))}


MODULES = parse_modules()


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The skipcache modules `tree` (module `name`) imports, each resolved to a module that exists
    (`from skipcache import cskip` is skipcache.cskip; `from skipcache import register_model_configs`
    is skipcache)."""
    is_package = any(m.startswith(name + ".") for m in known)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # skipcache.data.base.Example -> skipcache.data.base
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
    return out


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    known = set(modules)
    return {name: imported(name, tree, known) - {name} for name, tree in modules.items()}


GRAPH = import_graph(MODULES)


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"module {module} has no layer: add it to LAYERS here and to docs/design.md's module map")
    return rank


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# --------------------------------------------------------------------------------- the rules


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a layer above, or of the same layer across packages (one stage importing
    another is `stage_violations`' to report)."""
    def allowed(m: str, d: str) -> bool:
        if layer_of(d) != layer_of(m):
            return layer_of(d) < layer_of(m)
        return m.rpartition(".")[0] == d.rpartition(".")[0] or m.startswith(d + ".") or d.startswith(m + ".")

    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if not allowed(m, d)]


def stage_violations(graph: dict[str, set[str]]) -> list[str]:
    """A stage imports no other stage: what two stages share lives below them."""
    return [f"{m} imports {d}" for m, deps in sorted(graph.items()) if in_package(m, STAGES) and m != STAGES
            for d in sorted(deps) if in_package(d, STAGES) and d != m]


def below_stage_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {d}" for m, deps in sorted(graph.items()) if layer_of(m) < layer_of(STAGES)
            for d in sorted(deps) if any(in_package(d, top) for top in ABOVE_STAGES)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def owned_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: `self._x` / `cls._x` it sets or reads, and `_x` defined in a
    class body or at module level."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names.add(target.id)
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def _receiver(node: ast.AST) -> str:
    """`store` for `store._x`, `self.store` for `self.store._x`."""
    return ast.unparse(node)


def private_access_violations(modules: dict[str, ast.Module]) -> list[str]:
    """Accesses `obj._x` where `_x` is a private member that another skipcache module defines and
    this one does not, plus any `store._x` / `FeatureStore._x` outside the store modules, plus
    `from skipcache.m import _x` from another module."""
    owners: dict[str, set[str]] = {}
    for name, tree in modules.items():
        for attr in owned_private_names(tree):
            owners.setdefault(attr, set()).add(name)
    found = []
    for name, tree in sorted(modules.items()):
        own = owned_private_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skipcache"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.endswith("__") and node.module != name:
                        found.append(f"{name}: from {node.module} import {alias.name}")
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.endswith("__"):
                continue
            receiver = _receiver(node.value)
            if receiver in ("self", "cls"):
                continue
            looks_like_store = receiver.split(".")[-1] in ("store", "FeatureStore") or receiver.endswith("_store")
            if looks_like_store and name not in STORE_MODULES:
                found.append(f"{name}:{node.lineno}: {receiver}.{node.attr} (a private member of the store)")
            elif node.attr not in own and owners.get(node.attr, set()) - {name} and (name, node.attr) not in KNOWN_PRIVATE_ACCESS:
                where = ", ".join(sorted(owners[node.attr] - {name}))
                found.append(f"{name}:{node.lineno}: {receiver}.{node.attr} (private to {where})")
    return found


# ------------------------------------------------------------------------------------ tests


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_layer_above_it():
    assert layer_violations(GRAPH) == []


def test_no_stage_imports_another_stage():
    assert stage_violations(GRAPH) == []


def test_nothing_below_the_stages_imports_a_stage_the_pipeline_or_the_cli():
    assert below_stage_violations(GRAPH) == []


def test_imports_have_no_cycle():
    assert find_cycle(GRAPH) is None


def test_synthworld_needs_no_store():
    """Pretraining runs where zarr is not installed: synthworld imports only itself and errors."""
    for m, deps in GRAPH.items():
        if in_package(m, "skipcache.synthworld"):
            assert deps <= {d for d in GRAPH if in_package(d, "skipcache.synthworld")} | {"skipcache.errors"}, m


def test_loading_uses_the_weights_helper_not_the_trainer():
    assert "skipcache.synthworld.pretrain" not in GRAPH["skipcache.loading"]
    assert "skipcache.synthworld.weights" in GRAPH["skipcache.loading"]


def test_no_module_reaches_into_another_modules_private_members():
    assert private_access_violations(MODULES) == []


# ------------------------------------------------------------- the rules catch what they should


def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, ast.Module]:
    root = tmp_path / "skipcache"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {module_name_under(root, p): ast.parse(p.read_text()) for p in sorted(root.rglob("*.py"))}


def module_name_under(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@pytest.fixture
def broken(tmp_path):
    return _fake_package(tmp_path, {
        "__init__.py": "",
        "stages/__init__.py": "",
        "stages/tune.py": "def load_deep_model(): pass\n",
        "stages/evaluate.py": "from skipcache.stages.tune import load_deep_model\n",
        "rundir.py": "def f():\n    from skipcache.stages.tune import load_deep_model\n\n\ndef h(store):\n    return store._group\n",
        "store.py": "class FeatureStore:\n    def _array(self, n):\n        return self._arrays[n]\n",
        "store_read.py": "def read(store):\n    return store._array('x')\n",
        "loading.py": "from skipcache.rundir import f\n",
        "model.py": "from skipcache.loading import *\n",
        "placement.py": "def g(subset):\n    return subset._priority\n",
        "cskip.py": "class BatchSubset:\n    def __init__(self):\n        self._priority = 1\n",
    })


def test_the_rules_catch_a_broken_house(broken):
    graph = import_graph(broken)
    assert stage_violations(graph) == ["skipcache.stages.evaluate imports skipcache.stages.tune"]
    assert below_stage_violations(graph) == ["skipcache.rundir imports skipcache.stages.tune"]
    assert "skipcache.loading (loading) imports skipcache.rundir (rundir)" in layer_violations(graph)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert private_access_violations(broken) == [
        "skipcache.placement:2: subset._priority (private to skipcache.cskip)",
        "skipcache.rundir:6: store._group (a private member of the store)",
        "skipcache.store_read:2: store._array (private to skipcache.store)",
    ]
