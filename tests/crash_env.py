"""The daemon as a separate process, the way systemd runs it, for tests that kill it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mailbridge", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MAILBRIDGE_CONFIG": ""},
        )
