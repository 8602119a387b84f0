"""The house rules, read from the code: every import of every module, lazy ones included, points downward.

cli -> train -> distill -> teachers, students, losses, data, eval -> ops -> dtkernels, with `runtime`,
`levels` and `version` at the bottom for everyone. A failure names the file, the import and the rule it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE, KERNELS = ROOT / "dtengine", ROOT / "kernels"

# Part of dtengine -> the parts it may import. Anything not listed here may import nothing of dtengine but
# itself, `runtime` and `levels` (BOTTOM), so a new folder starts at the bottom until given its place.
BOTTOM = {"runtime", "levels", "version"}
ALLOWED = {
    "runtime": {"runtime"},
    "levels": set(),
    "version": set(),
    "ops": BOTTOM | {"ops"},
    "data": BOTTOM | {"data"},
    "losses": BOTTOM | {"losses", "ops"},
    "students": BOTTOM | {"students", "ops"},
    "teachers": BOTTOM | {"teachers", "ops"},
    "export": BOTTOM,
    "eval": BOTTOM | {"eval", "data", "ops", "losses", "students", "teachers"},
    "distill": BOTTOM | {"data", "ops", "losses", "students", "teachers"},
    "parallel": BOTTOM | {"parallel", "distill", "students"},
    "train": BOTTOM
    | {"train", "parallel", "distill", "data", "ops", "losses", "students", "teachers", "eval", "export"},
    "cli": BOTTOM | {"cli", "train", "distill", "data", "eval", "teachers", "__init__"},
    "__init__": BOTTOM | {"train", "parallel", "distill", "ops", "teachers", "students", "losses", "data", "export"},
    "__main__": {"cli"},
}
WHY = {
    "runtime": "runtime/ is the ground floor and imports nothing else of dtengine",
    "students": "students/ never imports teachers/ (the level type lives in dtengine.levels)",
    "data": "data/ never imports models, losses or loops",
}


def part_of(path: Path) -> str:
    relative = path.relative_to(ENGINE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (lazy imports count)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base == "dtengine":  # `from dtengine import x` reaches the submodule x, or the package's __init__
                found += [(node.lineno, f"dtengine.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def target_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "dtengine":
        return None
    if len(parts) == 1:
        return "__init__"
    if (ENGINE / parts[1]).is_dir() or (ENGINE / f"{parts[1]}.py").is_file():
        return parts[1]
    return "__init__"  # a name exported by dtengine/__init__.py


def engine_violations() -> list[str]:
    problems = []
    for path in sorted(ENGINE.rglob("*.py")):
        part = part_of(path)
        allowed = ALLOWED.get(part, BOTTOM | {part})
        for line, module in imported_modules(path):
            target = target_part(module)
            if target is None or target == part or target in allowed:
                continue
            rule = WHY.get(part, f"{part} may import only {', '.join(sorted(allowed))} of dtengine")
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({rule})")
    return problems


def kernel_violations() -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module} (dtkernels never imports dtengine)"
        for path in sorted(KERNELS.rglob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] == "dtengine"
    ]


def test_engine_imports_point_downward():
    assert engine_violations() == []


def test_kernels_never_import_the_engine():
    assert kernel_violations() == []


def test_every_engine_part_has_a_place():
    parts = {part_of(path) for path in ENGINE.rglob("*.py")}
    assert parts <= set(ALLOWED), f"give {sorted(parts - set(ALLOWED))} a place in ALLOWED"


@pytest.mark.parametrize(
    ("source", "module", "offending"),
    [
        ("students/fake.py", "from dtengine.teachers.diffusion import TeacherConfig", "students/ never imports"),
        ("runtime/fake.py", "from dtengine.data import DataConfig", "runtime/ is the ground floor"),
        ("eval/fake.py", "def f():\n    from dtengine.train.distillation import RunConfig", "eval may import only"),
        ("data/fake.py", "from ..students import student", "data/ never imports"),
    ],
)
def test_a_wrong_import_is_named(tmp_path, monkeypatch, source, module, offending):
    """The checker itself: a planted wrong edge (lazy and relative ones included) is reported with its rule."""
    fake_root = tmp_path / "repo"
    fake_engine = fake_root / "dtengine"
    (fake_engine / Path(source).parent).mkdir(parents=True)
    (fake_engine / source).write_text(module + "\n")
    for name in ("teachers", "train", "students", "data"):
        (fake_engine / name).mkdir(exist_ok=True)
    globals_ = globals()
    monkeypatch.setitem(globals_, "ROOT", fake_root)
    monkeypatch.setitem(globals_, "ENGINE", fake_engine)
    (problem,) = engine_violations()
    assert problem.startswith(f"dtengine/{source}:") and offending in problem
