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
    """A bundled config by name (`multi_gpu`, `multi_gpu.yaml`) or any YAML file by path.

    Something that looks like a path (it has a folder part) is never swapped for a bundled file of that name."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    bundled = (directory or configs_dir()) / f"{candidate.name.removesuffix('.yaml')}.yaml"
    if len(candidate.parts) == 1 and bundled.is_file():
        return bundled
    known = ", ".join(p.stem for p in list_configs(directory))
    raise UsageError(
        f"config {name_or_path!r} not found: give a YAML file path or one of {known} (see `accel-dp configs`)"
    )


def load_config(path: Path) -> dict:
    """An accelerate config file's settings, checked with accelerate's own loader: unknown keys and values fail here,
    not after the launch has started."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UsageError(
            f"config {path} is not valid YAML ({str(err).splitlines()[0]}): fix it or choose another"
        ) from None
    except UnicodeDecodeError as err:
        raise UsageError(
            f"config {path} is not UTF-8 text (byte {err.start}): convert it, e.g. `iconv -t UTF-8`, or choose another"
        ) from None
    except OSError as err:
        raise UsageError(f"config {path} cannot be read ({err.strerror}): fix it or choose another") from None
    if not isinstance(loaded, dict) or "distributed_type" not in loaded:
        raise UsageError(
            f"config {path} has no distributed_type: it is not an accelerate config (see `accelerate config`)"
        )
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(str(path))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"config {path} is not a valid accelerate config ({first}): fix it or choose another"
        ) from None
    return loaded
