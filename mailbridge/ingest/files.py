"""Fetch stage for local files (`mailbridge ingest`): .eml files, directories, mbox files and Maildirs."""

from __future__ import annotations

import mailbox
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from mailbridge.ingest.raw import RawMail

IMPORT_MAILBOX = "import"
# Files that sit beside mail in exported archives and test corpora but are never mail themselves.
NOT_MAIL_SUFFIXES = {".yaml", ".yml", ".json", ".md", ".py", ".csv", ".html", ".htm", ".pdf", ".zip", ".gz"}


def read_paths(
    paths: Iterable[Path], mailbox_name: str = IMPORT_MAILBOX, quiet: str | None = None
) -> Iterator[RawMail]:
    """Every mail under the given paths, one at a time (an archive never has to fit in memory)."""
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        for raw in _read_path(path, mailbox_name):
            yield replace(raw, quiet=quiet) if quiet else raw


def _read_path(path: Path, mailbox_name: str) -> Iterator[RawMail]:
    if path.is_dir():
        if is_maildir(path):
            for sub in ("new", "cur"):
                for file in sorted((path / sub).iterdir()):
                    if file.is_file() and not file.name.startswith("."):
                        yield _file_mail(file, mailbox_name)
            return
        for child in sorted(path.iterdir()):
            if not child.name.startswith(".") and child.suffix.lower() not in NOT_MAIL_SUFFIXES:
                yield from _read_path(child, mailbox_name)
        return
    if is_mbox(path):
        box = mailbox.mbox(path, create=False)
        try:
            for index, key in enumerate(box.iterkeys(), start=1):
                yield RawMail(mailbox=mailbox_name, source=f"{path}#{index}", data=box.get_bytes(key))
        finally:
            box.close()
        return
    yield _file_mail(path, mailbox_name)


def _file_mail(path: Path, mailbox_name: str) -> RawMail:
    return RawMail(mailbox=mailbox_name, source=str(path), data=path.read_bytes())


def is_maildir(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in ("new", "cur", "tmp"))


def is_mbox(path: Path) -> bool:
    with path.open("rb") as handle:
        # An mbox starts with a "From " envelope line; no RFC 5322 header can (no colon after "From").
        head = handle.read(5)
    return head == b"From "
