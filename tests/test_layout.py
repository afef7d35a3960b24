"""Which way the imports run, read from the code (every import, at module level or inside a
function): no import circle, no stage importing a higher one, and the server taking only the
train/serve contract package (loopfm/contract) from the training side."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a module may import its own package and any layer below, nothing above and
# nothing beside it. An entry names a package or a module; the longest entry that a module's
# name starts with places it. `serving` takes only `contract` (below); the live loop's writer
# (`stream`) reads its Feast layout. `eval` (metrics, baselines, the results table) sits below
# `vm`, which validates with its metrics. `pipeline.services` (Valkey, uvicorn) sits below
# `distributed`, whose torchrun launcher stops its child as a server is stopped. The pipeline's
# stage functions sit below the experiments and the bench that run them; the command line (with
# the checks it makes before each command) and the demo, which run all of those, are the single
# top layer.
LAYERS = [
    ("loopfm.contract",),
    ("serving",),
    ("loopfm.core",),
    ("loopfm.data",),
    ("loopfm.fm",),
    ("loopfm.features",),
    ("loopfm.eval",),
    ("loopfm.vm",),
    ("loopfm.stream",),
    ("loopfm.pipeline.services",),
    ("loopfm.distributed",),
    ("loopfm.pipeline", "loopfm.pipeline.stages", "loopfm.pipeline.run", "loopfm.pipeline.ingest"),
    ("loopfm.experiments", "loopfm.bench"),
    ("loopfm.pipeline.cli", "loopfm.pipeline.checks", "loopfm.pipeline.demo"),
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


def entry(module: str) -> str:
    """The longest entry of LAYERS that is `module` or a package holding it."""
    found = [p for prefixes in LAYERS for p in prefixes if module == p or module.startswith(p + ".")]
    assert found, f"{module} is in no layer of tests/test_layout.py: place it"
    return max(found, key=len)


def layer(module: str) -> int:
    return next(i for i, prefixes in enumerate(LAYERS) if entry(module) in prefixes)


def package(module: str) -> str:
    """`serving`, or loopfm's package of `module` (loopfm.pipeline for loopfm.pipeline.cli)."""
    parts = module.split(".")
    return ".".join(parts[:2] if parts[0] == "loopfm" else parts[:1])


def test_every_module_has_a_layer_and_imports_none_above_it():
    upward = [(m, i) for m, targets in imports().items() for i in targets if m != "loopfm" and layer(i) > layer(m)]
    assert upward == []


def test_packages_sharing_a_layer_do_not_import_each_other():
    sideways = [(m, i) for m, targets in imports().items() for i in targets
                if m != "loopfm" and layer(i) == layer(m) and package(i) != package(m)]  # fmt: skip
    assert sideways == []


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


def test_loopfm_holds_only_packages_at_its_bottom():
    assert sorted(p.name for p in (ROOT / "loopfm").glob("*.py")) == ["__init__.py"]
