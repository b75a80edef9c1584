"""The package layout is the architecture: no import cycle, and the lower layers import no job."""
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "slimlm"
JOBS = ("slimlm.pruning", "slimlm.quantize", "slimlm.train", "slimlm.methods", "slimlm.commands", "slimlm.cli",
        "slimlm.runtime.bench", "slimlm.report")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """slimlm module -> the slimlm modules it imports (at module level or inside functions)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def test_no_import_cycle():
    graph, seen, stack = import_graph(), set(), []

    def visit(node):  # depth-first: a node met again while on the stack closes a cycle
        stack.append(node)
        for nxt in sorted(graph[node]):
            assert nxt not in stack, "import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt])
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen.add(node)

    for node in sorted(graph):
        if node not in seen:
            visit(node)


def test_math_and_formats_import_no_job():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith(("slimlm.ops", "slimlm.formats", "slimlm.models", "slimlm.data")):
            jobs = sorted(t for t in targets if t.startswith(JOBS))
            assert not jobs, f"{name} imports {jobs}"
