"""The package's shape, checked from its source: no import cycle between its modules (imports inside
functions included), imports that go down the layers only, no function longer than a reader can hold,
and input kinds told apart in ``io/sources.py`` alone."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "microsnoop_ray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, anywhere in its body; a package's ``__init__`` stands for itself."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c in modules and c != name:
                found.add(c)
                break
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules: __init__ re-exports are not a cycle
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_the_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


#: The layers, lowest first: a module may import its own layer and those below it, never one above.
#: Stages (segment, crop, features, encode) sit side by side on the model's contract and import none
#: of each other's; the jobs (pipeline) put them together, and the command line calls the jobs.
LAYERS = (
    ("microsnoop_ray", "errors"),
    ("profiles",),
    ("plots",),
    ("io",),
    ("config",),
    ("model",),
    ("segment", "crop", "features", "encode"),
    ("evaluate", "train"),
    ("pipeline",),
    ("cli",),
)
#: imports allowed inside one layer (the stages of the layer above the model stay apart)
SIDE_BY_SIDE = {("evaluate", "encode"), ("evaluate", "features"), ("train", "crop"), ("train", "segment")}
LONGEST_FUNCTION = 60


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, names in enumerate(LAYERS) for name in names}
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            pa, pb = _part(a), _part(b)
            if pa == pb or "microsnoop_ray" in (pa, pb):  # the package root only re-exports, lazily
                continue
            if rank[pb] > rank[pa] or (rank[pb] == rank[pa] and (pa, pb) not in SIDE_BY_SIDE):
                bad.append(f"{a} -> {b}")
    return bad


def test_the_layer_check_finds_an_import_upwards():
    assert layer_violations({"microsnoop_ray.crop.windows": {"microsnoop_ray.encode.embed"},
                             "microsnoop_ray.io.tables": {"microsnoop_ray.pipeline.config"},
                             "microsnoop_ray.pipeline.stages": {"microsnoop_ray.io.sources"}}) == [
        "microsnoop_ray.crop.windows -> microsnoop_ray.encode.embed",
        "microsnoop_ray.io.tables -> microsnoop_ray.pipeline.config"]


def test_imports_go_down_the_layers():
    graph = import_graph()
    assert {_part(m) for m in graph} <= {n for names in LAYERS for n in names}, "a package without a layer"
    assert layer_violations(graph) == []


def function_lengths(source: str) -> list[tuple[str, int, int]]:
    """``(name, first line, lines)`` of every function: the lines from ``def`` to the end of its body,
    docstring included."""
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_longer_than_60_lines():
    long = [f"{f.relative_to(PACKAGE)}:{line} {name} ({n})" for f in sorted(PACKAGE.rglob("*.py"))
            for name, line, n in function_lengths(f.read_text()) if n > LONGEST_FUNCTION]
    assert not long, long


def test_input_kinds_are_told_apart_in_sources_only():
    """Work items carry their behaviour (``precropped``, ``crop_side``, ``supplied_objects``, ...): no other
    module asks an item for its class."""
    kinds = {"WorkItem", "ZarrField", "FileField", "CellChunk"}
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        if f.relative_to(PACKAGE).as_posix() == "io/sources.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) > 1 else set()
                if names & kinds:
                    found.append(f"{f.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, found


def test_the_read_and_crop_stages_and_the_command_line_import_without_torch():
    """Ray starts a worker process per read task and crop actor on every node; each that imports torch
    spends seconds of CPU and hundreds of MB on it before its first row. Only the encoder needs it.
    The command line too: ``--help``, a refused recipe and an image stack ``embed`` refuses answer
    without loading torch."""
    import subprocess
    import sys

    code = ("import sys; from microsnoop_ray.pipeline.stages import CropStage, read_row; "
            "from microsnoop_ray.pipeline.config import ProfileConfig, SegmentationConfig, CropConfig; "
            "CropStage(SegmentationConfig(), CropConfig()); import microsnoop_ray; "
            "from microsnoop_ray.cli import build_parser; build_parser(); import microsnoop_ray.pipeline.embed_job; "
            "from microsnoop_ray.train.config import TrainConfig; TrainConfig(sources=[{}]).validate(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
