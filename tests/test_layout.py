"""The product apart from the training recipes: no package module imports ``recipes``, and the wheel a user
installs holds the package without any training script."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jax_erasepro"
TRAINING_ONLY = ("training.py", "prefetch.py", "allocator.py", "xla_flags.py", "runs.py", "build.py")


def _imported(source: str, package: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``source`` names, anywhere in it (relative imports
    resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.add(".".join(p for p in (base, node.module or "") if p))
    return names


def _recipes(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] == "recipes")


def test_no_package_module_imports_the_recipes():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    found = {}
    for path in sources:
        package = ".".join(path.relative_to(ROOT).parts[:-1])
        if hits := _recipes(_imported(path.read_text(), package)):
            found[str(path.relative_to(ROOT))] = hits
    assert not found


def test_the_walk_sees_every_spelling_of_a_recipe_import():
    for source in ("import recipes.shapes_sd.training", "from recipes.shapes_sd import runs",
                   "from recipes import shapes_sd", "def f():\n    import recipes\n"):
        assert _recipes(_imported(source, "jax_erasepro.shapes")), source
    relative = _imported("from . import judge\nfrom ..diffusion import noised", "jax_erasepro.shapes")
    assert relative == {"jax_erasepro.shapes", "jax_erasepro.diffusion"} and not _recipes(relative)


def test_wheel_holds_the_package_and_no_training_script(tmp_path):
    """Built from a clean copy of the sources (no stale build/ folder), the recipes beside the package."""
    pytest.importorskip("setuptools")  # the build backend, used without isolation (no network)
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("jax_erasepro", "convert", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, cwd=src,
    )
    (wheel,) = (tmp_path / "dist").glob("jax_erasepro-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"jax_erasepro/diffusion.py", "jax_erasepro/shapes/judge.py", "jax_erasepro/shapes/labels.py",
            "jax_erasepro/shapes/world.py", "jax_erasepro/assets/shapes-clip/config.json"} <= set(names)
    assert not [n for n in names if n.startswith("recipes/")]
    scripts = [n for n in names if n.endswith(".py") and (Path(n).name.startswith("train_")
                                                            or Path(n).name in TRAINING_ONLY)]
    assert not scripts
