"""Which way the imports run, read from the code (every import, at module level or inside a
function): no import circle, no stage importing a higher one, and the server taking only the
train/serve contract package (loopfm/contract) from the training side."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a module may import its own layer and the ones below. `eval` (metrics,
# baselines, the results table) sits below `vm`, which validates with its metrics.
LAYERS = [
    ("loopfm.contract",),
    ("loopfm.config", "loopfm.io", "loopfm.parse", "loopfm.engine", "loopfm.training", "loopfm.sequences", "loopfm.children"),
    ("loopfm.data",),
    ("loopfm.fm",),
    ("loopfm.features",),
    ("loopfm.eval",),
    ("loopfm.vm",),
    ("loopfm.distributed", "loopfm.server_process", "loopfm.redis_server"),
    ("loopfm.experiments", "loopfm.bench", "loopfm.pipeline", "loopfm.stream", "serving"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the loopfm and serving modules it imports}, for every module of both packages."""
    graph = {}
    for path in [*ROOT.glob("loopfm/**/*.py"), *ROOT.glob("serving/**/*.py")]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[module_name(path)] = {m for m in found if m.split(".")[0] in ("loopfm", "serving")}
    return graph


def layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def test_every_module_has_a_layer_and_imports_none_above_it():
    upward = [(m, i) for m, targets in imports().items() for i in targets if m != "loopfm" and layer(i) > layer(m)]
    assert upward == []


def test_no_import_circle():
    graph = imports()
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(graph.get(module, ())):
            assert seen.get(target) != 1, f"import circle: {' -> '.join([*path, module, target])}"
            if target not in seen:
                visit(target, [*path, module])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [])


def test_serving_takes_only_the_contract_package_from_training_and_the_contract_nothing_else():
    graph = imports()
    from_training = {t for m, targets in graph.items() if m.startswith("serving") for t in targets if t.startswith("loopfm")}
    assert from_training and all(t.startswith("loopfm.contract") for t in from_training), from_training
    contract = {t for m, targets in graph.items() if m.startswith("loopfm.contract") for t in targets}
    assert all(t.startswith("loopfm.contract") for t in contract), contract


def test_stages_import_neither_orchestration_nor_distributed_engines():
    stages = ("loopfm.data", "loopfm.fm", "loopfm.features", "loopfm.eval", "loopfm.vm")
    above = ("loopfm.pipeline", "loopfm.distributed", "loopfm.experiments", "loopfm.bench", "serving")
    found = [(m, t) for m, targets in imports().items() if m.startswith(stages) for t in targets if t.startswith(above)]
    assert found == []
