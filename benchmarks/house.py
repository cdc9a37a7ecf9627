"""The house's measures (issues 24 and 29), each printed as a figure: function lengths, wide
signatures, imports inside functions, error handling in commands, run-folder file names outside
their module, and file writes outside the writers. Reads the source with ``ast``; imports
nothing of the package.

    python benchmarks/house.py            # the figures and the offenders
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fashion_sd"
RUN_FOLDER_NAMES = ("history.csv", "fid.csv", "scores.csv", "run.json", "sweep.log",
                    "train_state", "gallery")
LONG_EXEMPT = {"build_app"}  # the page is one declaration
# Calls that write a file. The writers (rundir.py: RunDir's folder names, EvalDir, SweepDir;
# training/writer.py: RunWriter) and the modules that own a file format (files.py, the LoRA and
# train-state formats, the weight and CLIP converters, the plots, the image settings, the
# caches, the caption files) may call them; a call anywhere else is a write its folder's writer
# does not know about.
WRITE_CALLS = {"atomic_path", "atomic_write_text", "save_file", "save_weights", "to_csv",
               "savefig", "write_text", "write_bytes", "save_lora", "save_train_state",
               "loss_curves", "sample_grid", "metric_curves", "all_loss_curves", "render_samples",
               "export_lora", "import_lora", "save_png"}
WRITERS = {"rundir.py", "writer.py", "files.py", "lora_file.py", "lora.py", "trainer.py",
           "plots.py", "image_settings.py", "cache.py", "shards.py", "weights.py", "clip.py",
           "hub_clip.py", "lora_formats.py", "models.py", "captions.py", "config.py",
           "runlock.py", "remote.py", "model_card.py"}
# Folders that are no run's or evaluation's, each with the one function or class that writes
# it: (module, scope) -> the folder.
OWNERS = {("generate.py", "generate_to_folder"): "generate's --out folder",
          ("assistant.py", "Gallery"): "the app's gallery",
          ("convert.py", "main"): "the one file convert's --out names"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def parameters(fn) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)


def inner_imports(tree) -> list[int]:
    lines = []
    for fn in functions(tree):
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                lines.append(node.lineno)
    return sorted(set(lines))


def write_calls(tree, module: str) -> list[tuple[int, str]]:
    """(line, name) of each call in ``tree`` to a function in :data:`WRITE_CALLS`, outside the
    scopes that :data:`OWNERS` names for ``module``."""
    found = []

    def visit(node, owned: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            owned = owned or (module, node.name) in OWNERS
        if isinstance(node, ast.Call) and not owned and not _to_a_writer(node.func):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in WRITE_CALLS:
                found.append((node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child, owned)

    visit(tree, False)
    return sorted(found)


def main() -> int:
    long_fns, wide, inner, excepts, names, writes = [], [], [], [], [], []
    for path in modules():
        rel = path.relative_to(ROOT)
        text = path.read_text()
        tree = ast.parse(text)
        # a module's public functions and its classes' methods (not handlers nested in them)
        api = [n for n in tree.body if isinstance(n, ast.FunctionDef)] + [
            m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body
            if isinstance(m, ast.FunctionDef)]
        for fn in functions(tree):
            n = fn.end_lineno - fn.lineno + 1
            if n > 80 and fn.name not in LONG_EXEMPT:
                long_fns.append(f"{rel}:{fn.lineno} {fn.name} {n} lines")
            public = not fn.name.startswith("_") or fn.name == "__init__"
            if parameters(fn) > 6 and public and fn in api:
                wide.append(f"{rel}:{fn.lineno} {fn.name} {parameters(fn)} parameters")
        inner += [f"{rel}:{line}" for line in inner_imports(tree)]
        if path.name not in WRITERS:
            writes += [f"{rel}:{line} {name}" for line, name in write_calls(tree, path.name)]
        if rel.parts[1:2] == ("commands",):
            excepts += [f"{rel}:{i + 1}" for i, line in enumerate(text.splitlines())
                        if re.search(r"except .*FashionSDError", line)]
        if path.name != "rundir.py":
            for name in RUN_FOLDER_NAMES:
                for i, line in enumerate(text.splitlines()):
                    code = line.split("#")[0]
                    if re.search(rf"[\"'/]{re.escape(name)}", code) and not _in_text(code, name):
                        names.append(f"{rel}:{i + 1} {name}")
    train_spine = _length("run.py", "train")
    print(f"train() (the spine): {train_spine} lines")
    for title, items in (("functions over 80 lines (build_app exempt)", long_fns),
                         ("public functions with more than six parameters", wide),
                         ("except FashionSDError in commands", excepts),
                         ("imports inside functions", inner),
                         ("run-folder file names outside rundir.py", names),
                         ("file writes outside the writers, format owners and folder owners", writes)):
        print(f"{title}: {len(items)}")
        for item in items if title != "imports inside functions" else items[:0]:
            print(f"  {item}")
    if "-v" in sys.argv:
        print("\n".join(f"  {i}" for i in inner))
    return 0


def _to_a_writer(func) -> bool:
    """``self.writer.save_train_state(...)``: a call to a folder's writer, which writes."""
    return isinstance(func, ast.Attribute) and ast.unparse(func.value).split(".")[-1] in (
        "writer", "folder")


def _in_text(code: str, name: str) -> bool:
    """A name inside a sentence for a person (help, messages, docstrings), not a path."""
    return bool(re.search(rf"[A-Za-z,;:(] [^\"']*{re.escape(name)}", code)) and "/" not in code


def _length(module: str, name: str) -> int:
    for path in modules():
        if path.name == module:
            for fn in functions(ast.parse(path.read_text())):
                if fn.name == name:
                    return fn.end_lineno - fn.lineno + 1
    return -1


if __name__ == "__main__":
    raise SystemExit(main())
