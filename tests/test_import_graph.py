"""The house's layers, read from every import in the package (function-level ones too): the
bottom (the top-level modules: config, files, rundir, ...) imports no stage; Stable Diffusion's
networks (``sd``) import only the bottom; no two stages (catalogue, training, evaluation,
serving, interop) import each other; only the entry points import the commands."""

import ast
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "fashion_sd"
STAGES = ("catalogue", "training", "evaluation", "serving", "interop")
ENTRY = ("commands", "cli", "__main__")


def layer(module: str) -> str:
    """``fashion_sd.X...``: its stage, ``sd``, an entry point, or ``bottom``."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top in STAGES or top == "sd" or top in ENTRY:
        return top if top not in ENTRY else "entry"
    return "bottom"


def imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports."""
    found = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fashion_sd"):
                for alias in node.names:  # "from fashion_sd.sd import lora" imports sd.lora
                    sub = f"{node.module}.{alias.name}"
                    is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                        (ROOT / Path(*sub.split("."))).is_dir()
                    found[module].add(sub if is_module else node.module)
            elif isinstance(node, ast.Import):
                found[module].update(a.name for a in node.names if a.name.startswith("fashion_sd"))
    return found


def test_the_layers_import_downwards_only():
    graph = imports()
    assert len(graph) > 60  # the whole package was read
    allowed = {"bottom": {"bottom"}, "sd": {"bottom", "sd"}}
    wrong = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs
                   if layer(b) not in allowed.get(layer(a), {layer(b)}))
    assert wrong == []
    into_entry = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs
                        if layer(b) == "entry" and layer(a) != "entry")
    assert into_entry == []
    between = defaultdict(set)
    for a, bs in graph.items():
        for b in bs:
            if layer(a) in STAGES and layer(b) in STAGES and layer(a) != layer(b):
                between[layer(a)].add((layer(b), f"{a} -> {b}"))
    mutual = sorted(edge for stage, out in between.items() for other, edge in out
                    if any(back == stage for back, _ in between.get(other, ())))
    assert mutual == []
