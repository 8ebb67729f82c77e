"""The accelerate configs shipped in accelerate_configs/: list them and resolve a name or a path to a file."""

from __future__ import annotations

from pathlib import Path

from .bundle import configs_dir
from .errors import UsageError


def list_configs(directory: Path | None = None) -> list[Path]:
    return sorted((directory or configs_dir()).glob("*.yaml"))


def describe_config(path: Path) -> str:
    """The first comment line of the file says what the config is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def resolve_config(name_or_path: str, directory: Path | None = None) -> Path:
    """A bundled config by name (`multi_gpu`, `multi_gpu.yaml`) or any YAML file by path."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate.resolve()
    bundled = (directory or configs_dir()) / f"{candidate.name.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    known = ", ".join(p.stem for p in list_configs(directory))
    raise UsageError(
        f"config {name_or_path!r} not found: give a YAML file path or one of {known} (see `accel-dp configs`)"
    )
