"""Who the customer is: a directory of organisations (YAML or CSV) with their mail domains and addresses,
tier (enterprise, standard …) and account manager. Read once at start-up; lookups are dictionary hits,
so 50,000 entries cost nothing per mail.

YAML: a list of {name, domains: [...], addresses: [...], tier, account_manager}.
CSV: columns name, domains, addresses, tier, account_manager (several domains or addresses separated by
spaces, commas or semicolons)."""

from __future__ import annotations

import csv
import operator
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

_SPLIT = re.compile(r"[\s,;]+")


class DirectoryError(Exception):
    """The customer directory cannot be read; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Organisation:
    name: str
    tier: str | None = None
    account_manager: str | None = None


@dataclass(frozen=True, slots=True)
class CrmAnswer:
    """What the CRM said about one sender (mailbridge/crm.py asks; the router uses the answer)."""

    organisation: Organisation | None  # None: the CRM does not know the sender, or could not say
    problem: str | None = None  # why the CRM could not say (timeout, refused, HTTP 503, not JSON …)


class CustomerDirectory:
    def __init__(self, organisations: Iterable[tuple[Organisation, list[str], list[str]]]) -> None:
        self.by_address: dict[str, Organisation] = {}
        self.by_domain: dict[str, Organisation] = {}
        for org, domains, addresses in organisations:
            for domain in domains:
                self.by_domain[domain.lower().lstrip("@")] = org
            for address in addresses:
                self.by_address[address.lower()] = org

    def __len__(self) -> int:
        return len({id(o) for o in (*self.by_address.values(), *self.by_domain.values())})

    def find(self, address: str) -> Organisation | None:
        """By the exact address, else by its domain or a parent domain (mail.firma.pl -> firma.pl)."""
        address = address.lower()
        if address in self.by_address:
            return self.by_address[address]
        domain = address.rpartition("@")[2]
        while domain:
            if domain in self.by_domain:
                return self.by_domain[domain]
            _, _, domain = domain.partition(".")
        return None

    @classmethod
    def load(cls, path: Path) -> CustomerDirectory:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DirectoryError(f"{path}: cannot read the customer directory: {exc.strerror}") from None
        rows: Iterable[tuple[object, ...] | None]
        if path.suffix.lower() == ".csv":
            rows = _csv_rows(text)
        else:
            try:
                entries = yaml.safe_load(text) or []
            except yaml.YAMLError as exc:
                raise DirectoryError(f"{path}: not valid YAML: {exc}") from None
            if not isinstance(entries, list):
                raise DirectoryError(f"{path}: must be a list of organisations")
            rows = (tuple(e.get(key) for key in _COLUMNS) if isinstance(e, dict) else None for e in entries)
        return cls(_organisations(path, rows))


_COLUMNS = ("name", "domains", "addresses", "tier", "account_manager")


def _csv_rows(text: str) -> Iterator[tuple[str | None, ...]]:
    """The columns we use, row by row, as csv.DictReader would give them (without a dict per row)."""
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        return
    position = {name: index for index, name in enumerate(header)}  # a repeated column: the last one wins
    wanted = [position.get(key) for key in _COLUMNS]
    pick = operator.itemgetter(*wanted) if None not in wanted else None
    last = max((i for i in wanted if i is not None), default=-1)
    for row in reader:
        if pick is not None and len(row) > last:
            yield pick(row)
        elif row:  # a short row (its missing columns are empty) or a missing column; blank lines are no entries
            yield tuple(row[i] if i is not None and i < len(row) else None for i in wanted)


def _organisations(
    path: Path, rows: Iterable[tuple[object, ...] | None]
) -> Iterator[tuple[Organisation, list[str], list[str]]]:
    for number, row in enumerate(rows, start=1):
        if row is None or not str(row[0] or "").strip():
            raise DirectoryError(f"{path}: entry {number} has no name")
        name, domains, addresses, tier, manager = row
        domain_list, address_list = _values(domains), _values(addresses)
        if not domain_list and not address_list:
            raise DirectoryError(f"{path}: entry {number} ({name}) has no domains and no addresses")
        # A few tiers and account managers, each shared by thousands of organisations: one string apiece.
        yield (
            Organisation(
                str(name).strip(),
                sys.intern(str(tier or "").strip().lower()) or None,
                sys.intern(str(manager or "").strip().lower()) or None,
            ),
            domain_list,
            address_list,
        )


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and _SPLIT.search(text := value.strip()) is None:
        return [text] if text else []  # one domain or address: the common case, without splitting
    items = value if isinstance(value, list) else _SPLIT.split(str(value))
    return [str(v).strip() for v in items if str(v).strip()]
