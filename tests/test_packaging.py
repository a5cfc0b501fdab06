"""A non-editable install works on its own: the wheel carries what the daemon reads at start-up."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What a build needs; copied, so the build leaves nothing behind in the checkout (build/, *.egg-info).
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "mailbridge", "templates")


def _copy_sources(target: Path) -> None:
    target.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, target / name)


def test_a_wheel_installed_elsewhere_renders_an_acknowledgement(tmp_path: Path) -> None:
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    _copy_sources(source)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)], check=True, timeout=300)
    [wheel] = wheels.glob("mailbridge-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True, timeout=300)
    shutil.rmtree(source)  # nothing may be read from a checkout

    # Run from a directory of its own, with the installed copy first on the path (the test venv's editable
    # install comes after it).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "MAILBRIDGE_CONFIG": ""}
    probe = subprocess.run(
        [sys.executable, "-c", "import mailbridge.notify.render as r; print(r.__file__); print(r.SHIPPED_TEMPLATES)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    module, templates = probe.stdout.split()
    assert Path(module).is_relative_to(site) and Path(templates) == site / "mailbridge" / "templates"

    inbox, sent = tmp_path / "inbox", tmp_path / "sent"
    (inbox / "new").mkdir(parents=True)
    mail = EmailMessage()
    mail["From"] = "Klient <klient@example.com>"
    mail["To"] = "support@helpdesk.example"
    mail["Subject"] = "Drukarka nie działa"
    mail["Message-ID"] = "<packaging-test@client.example>"
    mail.set_content("Dzień dobry, drukarka nie drukuje.\n")
    (inbox / "new" / "1.client").write_bytes(mail.as_bytes())
    config = tmp_path / "mailbridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "outbox": {"deliver_to_directory": str(sent), "domain": "helpdesk.example"},
                "mailboxes": [
                    {
                        "type": "maildir",
                        "name": "support",
                        "path": str(inbox),
                        "address": "support@helpdesk.example",
                        # the mail is there before the mailbox's first run: a backlog, answered only on request
                        "acknowledge_backlog": True,
                    }
                ],
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "mailbridge", "run", "--once", "--config", str(config)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [acknowledgement] = sent.glob("*.eml")
    answer = email.message_from_bytes(acknowledgement.read_bytes())
    assert answer["To"] == "Klient <klient@example.com>"
    assert "Drukarka nie działa" in str(email.header.make_header(email.header.decode_header(answer["Subject"])))
    text = next(p for p in answer.walk() if p.get_content_type() == "text/plain").get_payload(decode=True).decode()
    assert "We have opened ticket MB-000001" in text  # templates/en/ack.txt, as shipped in the wheel
