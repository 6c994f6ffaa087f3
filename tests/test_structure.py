"""The shape of the package: which tier may import which, and the torch-free parts.

Tiers (``../DESIGN`` "Shape of the code"): everything may import ``errors``; the
library (models <- probe <- methods; render <- metrics) never imports the run
folder, the jobs or the command line; ``rundir`` imports only leaves; ``report``
reads ``rundir`` and the metric registry and never imports torch; nothing but
the command line itself imports ``cli``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cam_cli"

LEAVES = {"cam_cli", "cam_cli.errors", "cam_cli.device", "cam_cli.render", "cam_cli.images"}
LIBRARY = ("cam_cli.models", "cam_cli.probe", "cam_cli.methods", "cam_cli.metrics", "cam_cli.targets")
#: module prefix -> prefixes it may import (besides itself and the leaves)
ALLOWED = {
    "cam_cli.models": (),
    "cam_cli.probe": ("cam_cli.models",),
    "cam_cli.methods": ("cam_cli.models", "cam_cli.probe"),
    "cam_cli.targets": ("cam_cli.models", "cam_cli.probe", "cam_cli.methods"),
    "cam_cli.metrics": (),
    "cam_cli.rundir": (),
    "cam_cli.report": ("cam_cli.rundir", "cam_cli.metrics"),
    "cam_cli.jobs": (*LIBRARY, "cam_cli.rundir"),
    "cam_cli.api": (*LIBRARY, "cam_cli.jobs"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every ``cam_cli`` module ``path`` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cam_cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cam_cli"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from cam_cli import rundir`
    return found


def tier(name: str) -> str | None:
    return next((prefix for prefix in ALLOWED if name == prefix or name.startswith(prefix + ".")), None)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").is_file() or (PACKAGE.parent / relative).is_dir()


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for target in sorted(imported(path)):
            if not is_module(target) or target in LEAVES:
                continue
            if (target == "cam_cli.cli" or target.startswith("cam_cli.cli.")) and not name.startswith(
                ("cam_cli.cli", "cam_cli.__main__")
            ):
                found.append(f"{name} imports the command line ({target})")
                continue
            own = tier(name)
            if own is None or tier(target) in (own, None) and target.startswith(own):
                continue
            if tier(target) != own and not any(target == p or target.startswith(p + ".") for p in ALLOWED[own]):
                found.append(f"{name} imports {target}")
    return found


def test_no_module_imports_upward_or_across_tiers() -> None:
    assert violations() == []


def test_the_checker_sees_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "cam_cli"
    (fake / "probe").mkdir(parents=True)
    (fake / "methods").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "methods" / "__init__.py").write_text("")
    (fake / "probe" / "__init__.py").write_text("from cam_cli.methods import create\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == ["cam_cli.probe imports cam_cli.methods"]


@pytest.mark.parametrize(
    "module",
    ["cam_cli", "cam_cli.rundir", "cam_cli.report", "cam_cli.methods.registry", "cam_cli.metrics", "cam_cli.images"],
)
def test_torch_free_parts_import_no_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
