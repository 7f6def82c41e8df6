"""House style that ruff cannot check: functions carry no type hints (types that
matter are said in docstrings; dataclass fields keep the annotations dataclasses
need), in all three packages."""

import ast
import os

from harness import REPO

PACKAGES = ("hpc_agent", "hpcd", "djangoapp")

#: Files still written with type hints, converted by their owners; each entry
#: must still have some (so the list only shrinks).
PENDING = set()


def _annotated_functions(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]
            if node.returns or any(n is not None and n.annotation for n in names):
                yield f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name}"


def _sources():
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    yield os.path.relpath(path, REPO).replace(os.sep, "/"), path


def test_functions_carry_no_type_hints():
    found = [hit for name, path in _sources() if name not in PENDING
             for hit in _annotated_functions(path)]
    assert found == [], "write the types in the docstring instead"


def test_pending_files_still_need_converting():
    done = [name for name, path in _sources()
            if name in PENDING and not any(_annotated_functions(path))]
    assert done == [], "converted: remove these from PENDING"
