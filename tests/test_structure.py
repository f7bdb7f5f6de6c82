"""The architecture's limits, as the maintainers set them: the patch module stays a thin router, no function in
nodes/ or attention/ grows past a screen, and the package has no import circle (each would fail here first)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LONGEST_FUNCTION = 60
PATCH_LINES = 350


def _modules():
    """Module name -> file, for the pack's own Python files (tests and CI scripts left out)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] in ("tests", ".ci", ".git") or any(part.startswith(".") for part in parts):
            continue
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules) -> set:
    """The pack's modules that ``name`` imports (relative imports, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = package.split(".") if package else []
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
        for alias in node.names:
            candidate = f"{target}.{alias.name}" if target else alias.name
            found.add(candidate if candidate in modules else target)
    return found & set(modules)


def test_no_import_circle_inside_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    circles = []

    def visit(name, stack):
        for imported in sorted(graph[name]):
            if imported in stack:
                circles.append(stack[stack.index(imported):] + [imported])
            elif imported not in visited:
                visited.add(imported)
                visit(imported, stack + [imported])

    for start in sorted(graph):
        visited = {start}
        visit(start, [start])
    assert not circles, [" -> ".join(circle) for circle in circles]


def test_no_function_in_nodes_or_attention_is_longer_than_a_screen():
    long = []
    for folder in ("nodes", "attention"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > LONGEST_FUNCTION:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_the_patch_module_stays_a_router():
    lines = len((ROOT / "nodes" / "patch.py").read_text().splitlines())
    assert lines <= PATCH_LINES, f"nodes/patch.py has {lines} lines"


def test_every_file_of_nodes_says_what_it_owns():
    for path in (ROOT / "nodes").glob("*.py"):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and len(docstring.splitlines()[0]) > 20, f"{path.name} opens without saying what it owns"
