"""The package's shape (issue 16): layers import only downward, no module imports itself in a
circle, files stay readable in one sitting, and only the run-directory module spells the layout's
file names. Read from the source with `ast`, function-level imports included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpcdistill"

# Lower numbers are lower layers; a module may import its own package and any lower layer.
# Packages on one layer are peers and do not import each other (train and analysis: a run writes
# shards, analysis reads them).
LAYERS = {
    "__init__": 0, "errors": 0,
    "spec": 1,
    "rundir": 2, "devices": 2, "kernels": 2,
    "record": 3, "tasks": 3,
    "distill": 4,
    "models": 5,
    "train": 6, "analysis": 6,
    "launch": 7, "worker": 7,
    "cli": 8,
}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """hpcdistill modules `path` imports; `from pkg import name` resolves to `pkg.name` when that
    is a module."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "hpcdistill"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "hpcdistill":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


# modules that belong to a package's layer: the worker is what launch submits (`python -m hpcdistill.worker`)
GROUPS = {"worker": "launch"}


def _package(module: str) -> str:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return GROUPS.get(name, name)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) & set(modules) for name, path in modules.items()}


def test_every_package_has_a_layer():
    assert {_package(m) for m in _modules()} <= set(LAYERS), set(map(_package, _modules())) - set(LAYERS)


def test_no_module_imports_a_higher_layer_or_a_peer_package():
    bad = []
    for module, imported in _graph().items():
        mine = _package(module)
        for other in imported:
            theirs = _package(other)
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine] and theirs != "__init__":
                bad.append(f"{module} -> {other}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    # package __init__ files re-export their modules (an idiom, not a dependency): left out
    graph = {m: {o for o in deps if not _modules()[o].name == "__init__.py"}
             for m, deps in _graph().items() if _modules()[m].name != "__init__.py"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_file_is_longer_than_one_sitting():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


# file names of the sweep and run directories (hpcdistill.rundir's docstring)
LAYOUT_NAMES = ["manifest.json", "run.json", "status.json", "worker.log", "rollout_weights", "vllm.log", "teacher.log",
                "probe_report.md", "teacher_ema.safetensors", "policy_lag.pt", ".model.tmp", "metrics.jsonl",
                "wandb_id"]


def _code_strings(tree: ast.AST):
    """String constants in code (f-string parts included), docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_only_the_run_directory_module_names_the_layouts_files():
    pattern = re.compile("|".join(re.escape(n) for n in LAYOUT_NAMES))
    hits = [f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}"
            for path in PACKAGE.rglob("*.py") if path.name != "rundir.py"
            for line, text in _code_strings(ast.parse(path.read_text())) if pattern.search(text)]
    assert not hits, "layout file names outside hpcdistill/rundir.py:\n" + "\n".join(hits)
