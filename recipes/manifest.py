"""A folder's manifest: each file's size and SHA-256, recorded once the folder is written whole and checked before it
is trusted (a checkpoint, a token cache entry), so that a file cut short or overwritten in place is never trained on.

Checking the sizes costs nothing; the SHA-256 reads every byte, about 1 s per GB here (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: Path) -> str:
    """A file's SHA-256, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(folder: Path, files: list[Path]) -> dict[str, list]:
    """{name relative to folder: [size, SHA-256]} of these files."""
    return {str(p.relative_to(folder)): [p.stat().st_size, sha256_of(p)] for p in files}


def check_manifest(folder: Path, files: dict[str, list], digests: bool = True) -> None:
    """Raise OSError naming the first file that is missing, has another size than was written, or (with `digests`)
    other contents."""
    for name, (size, digest) in files.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            raise OSError(f"{name} is missing or has another size than was written")
        if digests and sha256_of(file) != digest:
            raise OSError(f"{name} has changed since it was written (its SHA-256 differs)")
