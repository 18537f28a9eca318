"""The package layout's promises: one namespace a user's working directory cannot shadow, and
dependencies that point one way (data and kernels below everything; model and tracking below train
and eval; eval never imports train)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FOLDERS = {"data": "data", "kernels": "kernels", "model": "model", "tracking": "tracking", "train": "train",
           "eval": "eval", "slurm": "slurm", "ldot": "ldot"}
# package -> the ldot packages it must never import
FORBIDDEN = {
    "data": {"kernels", "model", "tracking", "train", "eval"},
    "kernels": {"data", "model", "tracking", "train", "eval"},
    "model": {"data", "tracking", "train", "eval"},
    "tracking": {"data", "kernels", "model", "train", "eval"},
    "eval": {"train"},
    "slurm": {"eval"},  # the batch-side checks use train's config and preflight; recall runs as a command
}


def ldot_imports(path: Path) -> set[str]:
    """The ldot subpackages a module imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "ldot" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_ldot_imports_sees_lazy_imports(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    from ldot.train.loop import train\n    import ldot.model.export\n")
    assert ldot_imports(probe) == {"train", "model"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    bad = []
    for path in sorted((ROOT / FOLDERS[package]).rglob("*.py")):
        for target in ldot_imports(path) & FORBIDDEN[package]:
            bad.append(f"{path.relative_to(ROOT)} imports ldot.{target}")
    assert not bad, "\n".join(bad)


def test_no_module_uses_the_old_top_level_names():
    """`from data import ...` would import a user's ./data folder, not ours."""
    old = {"data", "kernels", "train", "eval", "model", "tracking"}
    bad = []
    for folder in FOLDERS.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    top = node.module.split(".")[0]
                elif isinstance(node, ast.Import):
                    top = node.names[0].name.split(".")[0]
                else:
                    continue
                if top in old:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


@pytest.fixture
def shadowing_cwd(tmp_path):
    """A working directory holding data/, train/, eval/, kernels/, model/ and tracking/ packages of its
    own, each of which fails loudly when imported."""
    for name in ("data", "train", "eval", "kernels", "model", "tracking"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name}/ was imported')\n")
    return tmp_path


@pytest.mark.parametrize("argv", [
    [str(BIN / "ldot"), "--help"],
    [str(BIN / "ldot"), "data", "--help"],
    [str(BIN / "ldot"), "eval", "compare", "--help"],
    [sys.executable, "-m", "ldot.eval", "compare", "--help"],
    [sys.executable, "-m", "ldot.data", "inspect", "--help"],
    [sys.executable, "-m", "ldot", "train", "--help"],
])
def test_commands_are_not_shadowed_by_the_working_directory(shadowing_cwd, argv):
    proc = subprocess.run(argv, cwd=shadowing_cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_train_reports_a_bad_config_from_a_shadowing_directory(shadowing_cwd):
    proc = subprocess.run([str(BIN / "ldot"), "train", "--config", "nope.yaml"], cwd=shadowing_cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config file not found: nope.yaml"


def test_unknown_command_is_one_line_and_exit_2():
    proc = subprocess.run([str(BIN / "ldot"), "fit"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("ldot: unknown command 'fit'")


def test_test_modules_have_unique_names():
    """tests/ has no __init__.py files, so pytest imports each test module by its file name: two with
    one name in different folders stop the whole run at collection ("import file mismatch")."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name == "conftest.py" or "__pycache__" in path.parts:
            continue
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen.setdefault(path.name, path)
    assert not clashes, "test modules share a name: " + "; ".join(clashes)
