"""Architecture checks: no import cycles and no upward imports inside src/nora, read with `ast` (nothing is imported).

Every import counts, including those inside functions. Imports under `if TYPE_CHECKING:` are left out of both checks
(they may point upward for annotations and never run). `from pkg import name`, where `pkg/__init__` only re-exports
`name` from a submodule, is judged on that submodule, so a package's own re-exports never make a cycle by themselves.
"""

from __future__ import annotations

import ast
from collections import deque
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

SRC = Path(__file__).resolve().parents[1] / "src"

# Layers, lowest first: a module may import only modules of its own layer or lower ones.
# A key "nora.x" names one module; "nora.x.*" names package nora.x together with everything under it.
LAYERS: dict[str, int] = {
    **dict.fromkeys(
        [
            "nora.errors",
            "nora.registry",
            "nora.atomic",
            "nora.hf_compat",
            "nora.svd",
            "nora.quant",
            "nora.pretrained",
            "nora.prompts",
            "nora.datafiles",
            "nora.imagefiles",
            "nora.diffusion",
        ],
        0,
    ),
    **dict.fromkeys(["nora.chain", "nora.config", "nora.lean"], 1),
    "nora.loss": 2,  # the chunked causal-LM loss: asks nora.lean which family a model is
    "nora.basis": 2,
    "nora.methods.*": 3,
    # slots: the stores layers/ evaluates mixed batches from; layers/: one module per layer kind, the registry and
    # AdapterLayer (nora.layer re-exports it); calibrate measures activations at injected layers
    **dict.fromkeys(["nora.slots", "nora.layers.*", "nora.layer", "nora.inject", "nora.calibrate"], 4),
    # file_check: a file against a model, before anything is built; planning: plan → SVD → basis on layers
    **dict.fromkeys(["nora.io", "nora.file_check", "nora.planning", "nora.accel", "nora.peft_import"], 5),
    "nora.resident": 6,  # inference-only adapters as slots of stacked buffers
    "nora.state": 7,  # adapter state ↔ tensors, of module and resident adapters alike
    **dict.fromkeys(["nora.model", "nora.export", "nora.loftq"], 8),
    **dict.fromkeys(["nora.convert.*", "nora.plots", "nora.clip"], 9),
    # task kinds: each kind's options, model, data, loss and metrics; the applications above ask them
    "nora.tasks.*": 10,
    **dict.fromkeys(
        ["nora.training.*", "nora.evaluation.*", "nora.serving.*", "nora.demo", "nora.offline", "nora.hf_trainer"], 11
    ),
    **dict.fromkeys(["nora.cli.*", "nora.__main__", "nora"], 12),
}


class Edge(NamedTuple):
    src: str  # importing module
    named: str  # the module the statement names (a submodule, or the package for a name it defines)
    real: str  # where the name is really defined, following package re-exports
    where: str  # file:line


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "nora").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(node: ast.AST, type_checking: bool = False):
    """Yield (import node, under TYPE_CHECKING) for every import in the tree, however deeply nested."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, type_checking
        elif isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for stmt in child.body:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), type_checking)
        else:
            yield from _imports(child, type_checking)


def import_graph(root: Path = SRC) -> tuple[set[str], list[Edge]]:
    """All modules under root/nora and the runtime import edges between them."""
    modules = _modules(root)
    raw = []  # (src, from-module or None, names, where)
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node, type_checking in _imports(ast.parse(path.read_text(), str(path))):
            if type_checking:
                continue
            where = f"{path.relative_to(root.parent)}:{node.lineno}"
            if isinstance(node, ast.Import):
                raw += [(mod, None, [a.name], where) for a in node.names]
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base_name = ".".join(base + ([node.module] if node.module else []))
            raw.append((mod, base_name, [(a.name, a.asname or a.name) for a in node.names], where))

    reexports: dict[tuple[str, str], tuple[str, str | None]] = {}  # (package, name) -> (module, name there)
    for src, base, names, _ in raw:
        if base is not None and modules[src].name == "__init__.py":
            for name, alias in names:
                sub = f"{base}.{name}"
                reexports[(src, alias)] = (sub, None) if sub in modules else (base, name)

    def real(mod: str, name: str | None) -> str:
        seen = set()
        while name is not None and (mod, name) in reexports and (mod, name) not in seen:
            seen.add((mod, name))
            mod, name = reexports[(mod, name)]
        return mod

    edges = []
    for src, base, names, where in raw:
        if base is None:
            if names[0] in modules and names[0] != src:
                edges.append(Edge(src, names[0], names[0], where))
            continue
        for name, _ in names:
            sub = f"{base}.{name}"
            if sub in modules:
                edges.append(Edge(src, sub, sub, where))
            elif base in modules:  # a name defined (or re-exported) by module `base`; missing modules are skipped
                edges.append(Edge(src, base, real(base, None if name == "*" else name), where))
    return set(modules), [e for e in edges if e.named != e.src]  # `from . import x` in x's own package __init__


def find_cycles(modules: set[str], edges: list[Edge]) -> list[str]:
    """Import cycles as 'a → b → a', each step with its file:lines.

    A shortest cycle is found through every edge that lies on one; cycles that cross the same package boundaries
    (e.g. methods.lora → methods.base → config → methods → methods.lora and methods.base → config → methods →
    methods.base) are one problem and reported once, by the shortest.
    """
    by_pair: dict[tuple[str, str], list[str]] = {}
    for e in edges:
        if e.real != e.src and e.where not in by_pair.setdefault((e.src, e.real), []):
            by_pair[(e.src, e.real)].append(e.where)
    succ: dict[str, list[str]] = {}
    for a, b in sorted(by_pair):
        succ.setdefault(a, []).append(b)
    packages = {m.rpartition(".")[0] for m in modules}
    group = {m: m if m in packages else m.rpartition(".")[0] for m in modules}
    cycles: dict[frozenset[tuple[str, str]], list[str]] = {}
    for a, b in sorted(by_pair):
        prev, queue = {b: b}, deque([b])  # breadth-first search for the shortest path b → … → a
        while queue and a not in prev:
            node = queue.popleft()
            for nxt in succ.get(node, []):
                if nxt not in prev:
                    prev[nxt] = node
                    queue.append(nxt)
        if a not in prev:
            continue
        path = [a]
        while path[-1] != b:
            path.append(prev[path[-1]])
        chain = [a, *reversed(path)]
        steps = list(pairwise(chain))
        key = frozenset(s for s in steps if group[s[0]] != group[s[1]]) or frozenset(steps)
        if key not in cycles or len(chain) < len(cycles[key]):
            cycles[key] = chain
    return sorted(
        " → ".join(chain) + "".join(f"\n    {x} → {y}: {', '.join(by_pair[(x, y)])}" for x, y in pairwise(chain))
        for chain in cycles.values()
    )


def layer_of(module: str, layers: dict[str, int] = LAYERS) -> int | None:
    if module in layers:
        return layers[module]
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if (key := ".".join(parts[:i]) + ".*") in layers:
            return layers[key]
    return None


def upward_imports(edges: list[Edge], layers: dict[str, int] = LAYERS) -> list[str]:
    out = []
    for e in edges:
        lo, hi = layer_of(e.src, layers), layer_of(e.named, layers)
        if lo is not None and hi is not None and hi > lo:
            out.append(f"{e.where}: {e.src} (L{lo}) imports {e.named} (L{hi})")
    return list(dict.fromkeys(out))


def test_every_module_has_a_layer():
    modules, _ = import_graph()
    missing = sorted(m for m in modules if layer_of(m) is None)
    assert not missing, f"place these new modules in LAYERS at the top of {Path(__file__).name}: {missing}"


def test_no_import_cycles():
    cycles = find_cycles(*import_graph())
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_no_upward_imports():
    bad = upward_imports(import_graph()[1])
    assert not bad, f"{len(bad)} import(s) of a higher layer (see LAYERS):\n" + "\n".join(bad)


def test_checker_reports_cycles_and_upward_imports(tmp_path):
    files = {
        "__init__.py": "from .model import Model\n",
        "errors.py": "def f():\n    from .model import Model\n",  # in a function: still counts
        "model.py": "from . import errors\nfrom .methods import Lora\n",
        "config.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .model import Model\n"
        "def from_dict():\n    from .methods import get_method\n",  # get_method is defined in methods/__init__
        "methods/__init__.py": "from .base import Lora\nfrom .other import Other\ndef get_method(): ...\n",
        "methods/base.py": "from ..config import from_dict\n",
        "methods/other.py": "from nora.methods import Lora\n",  # a re-export: judged as methods.other → methods.base
    }
    for name, text in files.items():
        (tmp_path / "nora" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "nora" / name).write_text(text)
    modules, edges = import_graph(tmp_path)
    names = {"", ".errors", ".model", ".config", ".methods", ".methods.base", ".methods.other"}
    assert modules == {f"nora{n}" for n in names}
    assert ("nora.methods.other", "nora.methods", "nora.methods.base") in {e[:3] for e in edges}
    d = f"{tmp_path.name}/nora"
    assert find_cycles(modules, edges) == [
        f"nora.config → nora.methods → nora.methods.base → nora.config\n    nora.config → nora.methods: {d}/config.py:5"
        f"\n    nora.methods → nora.methods.base: {d}/methods/__init__.py:1"
        f"\n    nora.methods.base → nora.config: {d}/methods/base.py:1",
        f"nora.errors → nora.model → nora.errors\n    nora.errors → nora.model: {d}/errors.py:2"
        f"\n    nora.model → nora.errors: {d}/model.py:1",
    ]
    layers = {"nora.errors": 0, "nora.config": 1, "nora.methods.*": 3, "nora.model": 6, "nora": 9}
    assert upward_imports(edges, layers) == [
        f"{d}/config.py:5: nora.config (L1) imports nora.methods (L3)",
        f"{d}/errors.py:2: nora.errors (L0) imports nora.model (L6)",
    ]


# The names of nora's task kinds: only nora.tasks may compare a value with one (nothing else asks "is this seq-cls?")
TASK_NAMES = {"causal-lm", "causal", "seq-cls", "regression", "image-cls", "dreambooth"}


def task_name_comparisons(root: Path, skip: tuple[str, ...] = ("tasks/",)) -> list[str]:
    """Every comparison (==, !=, in, ...) with a task-name string literal (or a tuple/list/set of them) in the files
    under root/nora, outside the folders `skip` names: file:line each."""

    def literals(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literals(e) for e in node.elts))
        return set()

    found = []
    for path in sorted((root / "nora").rglob("*.py")):
        rel = path.relative_to(root / "nora").as_posix()
        if rel.startswith(skip):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare) and any(literals(s) & TASK_NAMES for s in (node.left, *node.comparators)):
                found.append(f"{rel}:{node.lineno}")
    return found


def test_no_task_name_comparisons_outside_the_task_kinds():
    found = task_name_comparisons(SRC)
    assert not found, f"ask the task kind (nora.tasks) instead of comparing its name: {found}"


def test_task_name_comparisons_are_found(tmp_path):
    (tmp_path / "nora" / "tasks").mkdir(parents=True)
    (tmp_path / "nora" / "a.py").write_text('x = 1\nif x == "seq-cls" or x in ("a", "dreambooth"):\n    pass\n')
    (tmp_path / "nora" / "b.py").write_text('y = {"seq-cls": 1}["seq-cls"]\nz = "image-cls" if True else ""\n')
    (tmp_path / "nora" / "tasks" / "k.py").write_text('if "x" != "regression":\n    pass\n')
    assert task_name_comparisons(tmp_path) == ["a.py:2", "a.py:2"]
