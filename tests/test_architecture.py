"""The tree shows the architecture: layers that point one way, no import cycle, folders and modules a reader can
take in, and `docs/architecture.md` drawing the tree that is really there.

Imports are read from the source (every `import` statement anywhere in a module: function-level and `if
TYPE_CHECKING:` ones count, because a cycle hidden behind either is still a knot a reader has to untie).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kneeoa

PACKAGE = Path(kneeoa.__file__).parent
DOC = PACKAGE.parents[1] / "docs" / "architecture.md"

#: Layers, bottom first. A module may import modules of its own layer and of the layers below, never above.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("kneeoa.errors", "kneeoa.io", "kneeoa.registry", "kneeoa.config", "kneeoa.tasks", "kneeoa.plotting"),
    "domain": ("kneeoa.formats", "kneeoa.synthetic", "kneeoa.localize", "kneeoa.sources", "kneeoa.transforms",
               "kneeoa.stats", "kneeoa.explain", "kneeoa.models"),
    "stage": ("kneeoa.runfolder", "kneeoa.arms", "kneeoa.stages", "kneeoa.report", "kneeoa.deploy",
              "kneeoa.builtin", "kneeoa.config_checks", "kneeoa.study", "kneeoa.runlock"),
    "face": ("kneeoa.cli", "kneeoa.api", "kneeoa"),
}
MAX_MODULES_PER_FOLDER = 14
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The kneeoa modules `path` imports anywhere, TYPE_CHECKING blocks and functions included, with the packages
    whose __init__ an import runs."""
    found: set[str] = set()

    def add(name: str) -> None:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):
            if ".".join(parts[:i]) in modules:
                found.add(".".join(parts[:i]))

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            add(node.module)
            for alias in node.names:
                add(f"{node.module}.{alias.name}")
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the kneeoa modules it imports. A module's own parent packages are left out: they are always
    initialised before it, so importing them again is never a cycle."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports(path, set(files)) for name, path in files.items()}
    return {name: {d for d in deps if d != name and not name.startswith(d + ".")} for name, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def layer_of(module: str) -> int:
    """Index of the layer that holds `module` (the longest matching prefix wins: `kneeoa` itself is the face)."""
    best, depth = -1, -1
    for i, prefixes in enumerate(LAYERS.values()):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    return best


def upward_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    return {m: bad for m, deps in graph.items() if (bad := sorted(d for d in deps if layer_of(d) > layer_of(m)))}


def test_the_import_walk_counts_function_level_and_type_checking_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kneeoa.stages import train\n\n"
                      "def f():\n    import kneeoa.cli.models\n")
    assert imports(source, {"kneeoa.stages", "kneeoa.stages.train", "kneeoa.cli", "kneeoa.cli.models"}) == {
        "kneeoa.stages", "kneeoa.stages.train", "kneeoa.cli", "kneeoa.cli.models"}


def test_every_module_has_a_layer():
    assert not [m for m in import_graph() if layer_of(m) < 0], "add the new package to LAYERS and the docs"


def test_the_layer_check_catches_an_upward_import():
    assert upward_imports({"kneeoa.models.probes": {"kneeoa.runfolder.heads"}, "kneeoa.stages.boost": {
        "kneeoa.models.probes"}}) == {"kneeoa.models.probes": ["kneeoa.runfolder.heads"]}


def test_no_import_cycle_type_checking_ones_included():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_layers_point_one_way():
    """Nothing below the stages imports stages, report, deploy, cli or the run folder; base imports nothing above."""
    assert not upward_imports(import_graph())


def test_stages_and_the_report_never_import_a_stage():
    """Stages talk through run-folder files only."""
    offenders = {name: sorted(d for d in deps if d == "kneeoa.stages" or d.startswith("kneeoa.stages."))
                 for name, deps in import_graph().items() if name.startswith(("kneeoa.stages.", "kneeoa.report"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_folder_holds_more_than_fourteen_modules():
    crowded = {str(d.relative_to(PACKAGE)): n for d in [PACKAGE, *PACKAGE.rglob("*")] if d.is_dir()
               and (n := len(list(d.glob("*.py")))) > MAX_MODULES_PER_FOLDER}
    assert not crowded


def test_no_module_is_over_the_size_limit():
    """Every module stays small enough to read in one sitting."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def doc_tree(text: str) -> set[str]:
    """The paths drawn in the architecture doc's ```tree block: two spaces of indent per level, folders end in /."""
    block = re.search(r"```tree\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```tree block"
    paths, stack = set(), []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        name = line.split()[0]
        level = (len(line) - len(line.lstrip(" "))) // 2
        stack[level:] = [name]
        paths.add("".join(stack).rstrip("/"))
    return paths


def real_tree() -> set[str]:
    root = PACKAGE.parent
    files = {str(p.relative_to(root)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    folders = {str(p.parent.relative_to(root)) for p in PACKAGE.rglob("__init__.py")}
    return files | folders


def test_the_doc_tree_parser_reads_nesting():
    assert doc_tree("```tree\nkneeoa/  x\n  a.py  y\n  b/  z\n    c.py  w\n```") == {
        "kneeoa", "kneeoa/a.py", "kneeoa/b", "kneeoa/b/c.py"}


def test_the_architecture_doc_draws_the_tree_that_is_there():
    drawn, real = doc_tree(DOC.read_text()), real_tree()
    assert not real - drawn, f"in src but not in docs/architecture.md: {sorted(real - drawn)}"
    assert not drawn - real, f"in docs/architecture.md but not in src: {sorted(drawn - real)}"
