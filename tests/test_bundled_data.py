"""The bundled corpora are the unmodified files that data/README.md documents."""

import hashlib
import re

import pytest
from conftest import DATA_DIR

DOCUMENTED = dict(re.findall(r"\| `([^`]+)` \|[^\n]*\| `([0-9a-f]{64})` \|", (DATA_DIR / "README.md").read_text()))


def test_every_bundled_file_is_documented():
    shipped = {str(p.relative_to(DATA_DIR)) for p in DATA_DIR.rglob("*") if p.is_file() and p.name != "README.md"}
    assert shipped == set(DOCUMENTED)


@pytest.mark.parametrize("relative_path", sorted(DOCUMENTED))
def test_checksum_matches_the_readme(relative_path):
    assert hashlib.sha256((DATA_DIR / relative_path).read_bytes()).hexdigest() == DOCUMENTED[relative_path]
