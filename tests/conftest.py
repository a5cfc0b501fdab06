from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"


@pytest.fixture
def config_file(tmp_path: Path) -> Iterator[Path]:
    """A config with its own data directory and no mailboxes (what `ingest` and the CLI tests need)."""
    path = tmp_path / "mailbridge.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "storage": {"fsync": False}}))
    yield path
