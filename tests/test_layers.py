"""Layers that only point down, and no import cycles.

Every module under ``src/mindvis`` belongs to one layer; a module may import from its own layer and the layers
below it, never from a layer above. The imports are read with :mod:`ast`, not by importing anything: those at
module level, those inside functions (which run later, but still make the lower layer depend on the higher
one), relative ones (``from . import x``) and those under ``if TYPE_CHECKING:`` (an annotation naming a
higher layer's class is the same upward dependency, only hidden). Apart from the layers, the modules must not
import each other in a circle, at module level or inside functions (``TYPE_CHECKING`` imports do not run and are
left out of that check).

The layers, lowest first (a module takes the layer of the longest entry that names it or a package above it):

===========  ====================================================  ================================================
layer        modules                                               why here
===========  ====================================================  ================================================
base         ``mindvis`` (the package), ``errors``,                the version, the exceptions every layer raises,
             ``config``                                            and what every settings dataclass shares
utils        ``utils.*``                                           file output, hashing, provenance, linear algebra,
                                                                   image arrays (``utils.images``: resizing, grids,
                                                                   PNG files): nothing about fMRI or models
data         ``data.*``, ``safeload``,                             reading files from outside (``safeload`` shares
             ``synthcortex.*``                                     the readers' size checks), datasets,
                                                                   preprocessing, data loaders and their samplers;
                                                                   the simulator that writes data in the real
                                                                   formats (it reads its stimulus sources through
                                                                   ``safeload``)
models       ``models.*``, ``sampling``                            the networks, their configs and loaders, and the
                                                                   noise schedules and samplers a model runs with
pipeline     ``pipeline``, ``reconstruct``                         a model with its preprocessing and sampler, the
                                                                   folder format trained models are saved in, and
                                                                   reconstruction from fMRI files or dataset
                                                                   splits into an output folder
scoring      ``eval.images``, ``eval.metrics``, ``eval.networks``, scores of reconstructed images against the seen
             ``eval.fid``, ``eval.classifier``, ``eval.suite``,    ones; below ``train`` because training validates
             ``eval.config``                                       with the same suite; the settings of the
                                                                   evaluation commands, where the suite's metric
                                                                   groups are defined
train        ``train.*``, ``convert.*``                            what makes model folders: training (which saves
                                                                   pipelines and scores them) and the converters
                                                                   of the original checkpoints (which save
                                                                   pipelines too)
eval         ``eval.*`` (the rest: ``probe``, ``report``, ...),    experiments on trained models and their reports:
             ``baselines``                                         they load priors and encoders the way training
                                                                   does
report       ``demo_report``, ``departures``                       the demo's report and the table of departures
                                                                   from the original that it prints
demo         ``demo``, ``demo_presets``                            the end-to-end run that ``mindvis demo`` starts
                                                                   and its presets (the config of every step)
commands     ``commands.*``                                        one command line command each, calling the
                                                                   library
cli          ``cli``                                               the entry point that registers every command
===========  ====================================================  ================================================

The issue that asked for this test orders the packages "data, models, train, pipeline, eval, commands and demo".
Two of those steps do not hold in this code and are not meant to: training builds and saves
:class:`~mindvis.pipeline.MindVisPipeline` folders and validates with :mod:`mindvis.eval.suite`, so
``pipeline`` and the image scoring of ``eval`` lie below ``train``; the rest of ``eval`` (the probes, the report)
lies above it.

An import inside a function is there only to keep something heavy from loading with its module: a heavy
third-party package (torch, diffusers, lightning, scipy, matplotlib, ...), or, in the modules that
``mindvis --help`` loads, a library module that ``--help`` does not need
(:func:`test_function_level_imports_only_defer_heavy_packages`); and ``mindvis --help`` loads none of those
packages (:func:`test_cli_import_stays_light`).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "mindvis"

#: The layers, lowest first: ``(name, entries)``; an entry is a module or a package (then also its modules).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mindvis", "mindvis.errors", "mindvis.config")),
    ("utils", ("mindvis.utils",)),
    ("data", ("mindvis.data", "mindvis.safeload", "mindvis.synthcortex")),
    ("models", ("mindvis.models", "mindvis.sampling")),
    ("pipeline", ("mindvis.pipeline", "mindvis.reconstruct")),
    (
        "scoring",
        (
            "mindvis.eval.images",
            "mindvis.eval.metrics",
            "mindvis.eval.networks",
            "mindvis.eval.fid",
            "mindvis.eval.classifier",
            "mindvis.eval.suite",
            "mindvis.eval.config",
        ),
    ),
    ("train", ("mindvis.train", "mindvis.convert")),
    ("eval", ("mindvis.eval", "mindvis.baselines")),
    ("report", ("mindvis.demo_report", "mindvis.departures")),
    ("demo", ("mindvis.demo", "mindvis.demo_presets")),
    ("commands", ("mindvis.commands",)),
    ("cli", ("mindvis.cli",)),
]

#: Upward imports allowed for now: ``(importer, imported) -> why``. Each must still exist (a stale entry fails).
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

#: Third-party packages that do not count as heavy: a function-level import that would only add these to the
#: importing module's module-level imports has no reason to stay in the function.
LIGHT_PACKAGES = frozenset({"numpy", "typer"})
#: Packages that ``mindvis --help`` must not load.
HEAVY_PACKAGES = frozenset(
    {"torch", "torchvision", "diffusers", "lightning", "scipy", "matplotlib", "timm", "sklearn", "skimage"}
)


@dataclass(frozen=True)
class Import:
    """One import of a mindvis module found in the source."""

    importer: str
    imported: str
    line: int
    in_function: bool
    type_checking: bool

    @property
    def module_level(self) -> bool:
        return not self.in_function and not self.type_checking


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative forms resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The mindvis modules an import statement loads: ``from pkg import name`` is the submodule ``pkg.name``
    where there is one, else ``pkg``."""
    known = _modules()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = _resolve(module, is_package, node)
        names = [
            f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names
        ]
    return list(dict.fromkeys(n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")))


@cache
def _imports(module: str) -> tuple[Import, ...]:
    path = _modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(module, is_package, node):
                found.append(Import(module, target, node.lineno, in_function, type_checking))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, type_checking)
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(tree, False, False)
    return tuple(found)


def _layer_index() -> dict[str, int]:
    return {entry: i for i, (_name, entries) in enumerate(LAYERS) for entry in entries}


def _layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the longest entry naming ``module`` or a package above it (``mindvis``, the
    package itself, names only itself)."""
    index = _layer_index()
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        entry = ".".join(parts[:n])
        if entry in index and (entry != PACKAGE or module == PACKAGE):
            return index[entry]
    return None


def _where(imp: Import) -> str:
    kind = "TYPE_CHECKING " if imp.type_checking else "function-level " if imp.in_function else ""
    path = _modules()[imp.importer].relative_to(ROOT)
    return f"{path}:{imp.line}: {imp.importer} {kind}imports {imp.imported}"


def _upward_imports() -> list[tuple[Import, int, int]]:
    out = []
    for module in _modules():
        for imp in _imports(module):
            low, high = _layer_of(imp.importer), _layer_of(imp.imported)
            if low is not None and high is not None and high > low:
                out.append((imp, low, high))
    return out


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if _layer_of(m) is None]
    assert not missing, f"modules without a layer (add them to LAYERS, with the reason): {missing}"
    unknown = [
        e
        for _name, entries in LAYERS
        for e in entries
        if not any(m == e or m.startswith(e + ".") for m in _modules())
    ]
    assert not unknown, f"LAYERS names modules that do not exist: {unknown}"


def test_imports_only_point_down():
    problems = []
    used = set()
    for imp, low, high in _upward_imports():
        if (imp.importer, imp.imported) in ALLOWED_UPWARD:
            used.add((imp.importer, imp.imported))
            continue
        problems.append(f"{_where(imp)} (layer {LAYERS[low][0]} -> {LAYERS[high][0]})")
    assert not problems, "imports that point to a higher layer:\n" + "\n".join(problems)
    stale = sorted(set(ALLOWED_UPWARD) - used)
    assert not stale, f"ALLOWED_UPWARD entries no longer needed (remove them): {stale}"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycles():
    """No circle of run-time imports: module-level ones, and function-level ones too (a circle that only closes
    when a function runs is still a circle; moving such an import into a function only hides it)."""
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], Import] = {}
    for module in _modules():
        for imp in _imports(module):
            if not imp.type_checking and imp.imported != module:
                edges.setdefault(module, set()).add(imp.imported)
                if (module, imp.imported) not in lines or lines[module, imp.imported].in_function:
                    lines[module, imp.imported] = imp  # a module-level one shown where there is one
    problems = []
    for component in _cycles(edges):
        members = set(component)
        inside = [imp for (a, b), imp in sorted(lines.items()) if a in members and b in members]
        problems.append("cycle among " + ", ".join(component) + ":\n  " + "\n  ".join(map(_where, inside)))
    assert not problems, "import cycles:\n" + "\n".join(problems)


@cache
def _third_party(module: str) -> frozenset[str]:
    """Top-level third-party packages that importing ``module`` loads through module-level imports, its
    own and those of the mindvis modules it imports (``TYPE_CHECKING`` blocks left out)."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    path = _modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            own.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            own.add(node.module.split(".")[0])
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.iter_child_nodes(node):
                visit(child)

    visit(tree)
    packages = {p for p in own if p not in stdlib and p != PACKAGE}
    return frozenset(packages)


def _closure(module: str) -> frozenset[str]:
    seen: set[str] = set()
    todo = [module]
    packages: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen or m not in _modules():
            continue
        seen.add(m)
        packages |= _third_party(m)
        todo.extend(imp.imported for imp in _imports(m) if imp.module_level)
    return frozenset(packages)


@cache
def _loaded_by_cli() -> tuple[frozenset[str], frozenset[str]]:
    """``(mindvis modules, heavy packages)`` that ``import mindvis.cli`` (all ``mindvis --help`` needs) loads,
    found in a fresh interpreter."""
    code = (
        "import json, sys, mindvis.cli; "
        f"print(json.dumps([sorted(m for m in sys.modules if m == {PACKAGE!r} or m.startswith({PACKAGE!r} + '.')), "
        f"[m for m in {sorted(HEAVY_PACKAGES)!r} if m in sys.modules]]))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    modules, heavy = json.loads(res.stdout)
    return frozenset(modules), frozenset(heavy)


#: Function-level imports that defer nothing heavy but stay in a function: ``(importer, imported)`` (none now).
DEFERRED: frozenset[tuple[str, str]] = frozenset()


def test_function_level_imports_only_defer_heavy_packages():
    """A ``from mindvis... import`` inside a function must keep something heavy from loading when the importing
    module is imported: a third-party package the module does not load anyway (torch, diffusers, lightning,
    scipy, matplotlib, ...), or, in the modules ``mindvis --help`` loads, a mindvis module it does not load
    (the library modules the commands run take as long to import as numpy does). Any other belongs at the top
    of the module."""
    cli_modules, _heavy = _loaded_by_cli()
    problems = []
    used = set()
    for module in _modules():
        for imp in _imports(module):
            if not imp.in_function or imp.type_checking:
                continue
            if module in cli_modules and imp.imported not in cli_modules:
                continue  # keeps `mindvis --help` from loading it
            if _closure(imp.imported) - _closure(module) - LIGHT_PACKAGES:
                continue  # defers a heavy third-party package
            if (module, imp.imported) in DEFERRED:
                used.add((module, imp.imported))
                continue
            problems.append(_where(imp))
    assert not problems, (
        "function-level imports that defer nothing heavy (move them to the top of the module):\n"
        + "\n".join(problems)
    )
    stale = sorted(DEFERRED - used)
    assert not stale, f"DEFERRED entries no longer needed (remove them): {stale}"


def test_cli_import_stays_light():
    """``mindvis --help`` imports every command module; none of them may load a heavy package at import time."""
    _modules_loaded, heavy = _loaded_by_cli()
    assert not heavy, f"importing mindvis.cli loads {sorted(heavy)}"
