"""Where the recipes, accelerate configs and bundled data live.

A wheel carries them inside the package as accel_dp/_bundle/{recipes,accelerate_configs,data}; a source
checkout (or an editable install) has them at the repository root. Both have the same layout, so a recipe
finds the bundled data at ../data relative to itself in either case.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def bundle_root() -> Path:
    installed = _PACKAGE_DIR / "_bundle"
    if (installed / "recipes").is_dir():
        return installed
    return _PACKAGE_DIR.parent


def recipes_dir() -> Path:
    return bundle_root() / "recipes"


def configs_dir() -> Path:
    return bundle_root() / "accelerate_configs"
