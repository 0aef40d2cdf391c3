"""Where the embedded default model (shapes-sd) lives inside the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def default_model_path() -> Path:
    """The shipped shapes-sd folder; raises FileNotFoundError while it is not shipped yet."""
    path = Path(str(resources.files("jax_erasepro") / "assets" / "shapes-sd"))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded default model is not installed ({path} is missing)")
    return path
