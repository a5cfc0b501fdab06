"""Who the customer is: a directory of organisations (YAML or CSV) with their mail domains and addresses,
tier (enterprise, standard …) and account manager. Read once at start-up; lookups are dictionary hits,
so 50,000 entries cost nothing per mail.

YAML: a list of {name, domains: [...], addresses: [...], tier, account_manager}.
CSV: columns name, domains, addresses, tier, account_manager (several domains or addresses separated by
spaces, commas or semicolons)."""

from __future__ import annotations

import csv
import re
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
    def __init__(self, organisations: list[tuple[Organisation, list[str], list[str]]]) -> None:
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
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        else:
            try:
                rows = yaml.safe_load(text) or []
            except yaml.YAMLError as exc:
                raise DirectoryError(f"{path}: not valid YAML: {exc}") from None
            if not isinstance(rows, list):
                raise DirectoryError(f"{path}: must be a list of organisations")
        entries = []
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict) or not str(row.get("name") or "").strip():
                raise DirectoryError(f"{path}: entry {number} has no name")
            domains = _values(row.get("domains"))
            addresses = _values(row.get("addresses"))
            if not domains and not addresses:
                raise DirectoryError(f"{path}: entry {number} ({row['name']}) has no domains and no addresses")
            tier = str(row.get("tier") or "").strip().lower() or None
            manager = str(row.get("account_manager") or "").strip().lower() or None
            entries.append((Organisation(str(row["name"]).strip(), tier, manager), domains, addresses))
        return cls(entries)


def _values(value: object) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else _SPLIT.split(str(value))
    return [str(v).strip() for v in items if str(v).strip()]
