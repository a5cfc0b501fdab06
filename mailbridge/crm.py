"""Who the customer is, asked of a CRM over HTTP (`routing.customers.crm`), for the senders the customer
directory does not know.

The pipeline asks on the main event loop, before the batch's transaction (no network wait while the
database is held), for all the distinct senders of a batch at once and within one deadline
(`timeout_seconds`), so a batch waits at most that long. Answers are cached (`cache_seconds`; "not known",
i.e. 404 or an empty answer, for `negative_cache_seconds`). When the CRM fails (no answer in time, refused,
an HTTP error, not JSON) the answer says why: the router routes by the rules alone and flags the ticket.
One warning is logged per outage, and the CRM is then left alone for `pause_after_failure_seconds`
(a circuit breaker), so a CRM that is down costs one timeout per pause, not one per batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from cachetools import TLRUCache

from mailbridge.customers import CrmAnswer, Organisation
from mailbridge.routing_rules import CrmSettings

log = logging.getLogger("mailbridge.crm")


class _CrmFailing(Exception):
    """The CRM itself is failing (every lookup would): the breaker opens."""


class _UnusableAnswer(Exception):
    """The CRM answered, but not with a customer we can read (this sender only)."""


@dataclass(slots=True)
class _Outage:
    since: datetime
    problem: str
    skipped: int = 0  # lookups not made while the breaker was open


class Crm:
    def __init__(self, settings: CrmSettings) -> None:
        self.settings = settings
        self.host = urlsplit(settings.url.format(address="a", domain="d")).netloc
        self._cache: TLRUCache[str, CrmAnswer] = TLRUCache(maxsize=settings.cache_entries, ttu=self._expires)
        self._client: aiohttp.ClientSession | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._outage: _Outage | None = None
        self._paused_until = 0.0  # event-loop time

    @property
    def failing(self) -> tuple[datetime, str] | None:
        """Since when and why the CRM fails (until a lookup is answered again); None while it answers."""
        return (self._outage.since, self._outage.problem) if self._outage is not None else None

    def url_for(self, address: str) -> str:
        address = address.strip().lower()
        domain = address.rpartition("@")[2]
        return self.settings.url.format(address=quote(address, safe="@"), domain=quote(domain, safe=""))

    async def look_up(self, addresses: Iterable[str]) -> dict[str, CrmAnswer]:
        """Who each sender is, by its address (lower-case). Never raises for the CRM's faults."""
        urls = {address.lower(): self.url_for(address) for address in addresses}
        answers: dict[str, CrmAnswer] = {}
        to_ask: dict[str, list[str]] = {}  # one request per URL: a {domain} template asks once per domain
        for address, url in urls.items():
            cached = self._cache.get(url)
            if cached is not None:
                answers[address] = cached
            else:
                to_ask.setdefault(url, []).append(address)
        if not to_ask:
            return answers
        loop = asyncio.get_running_loop()
        if self._outage is not None and loop.time() < self._paused_until:
            self._outage.skipped += len(to_ask)
            not_asked = CrmAnswer(None, self._not_asked(self._outage))
            answers.update((address, not_asked) for group in to_ask.values() for address in group)
            return answers
        deadline = loop.time() + self.settings.timeout_seconds
        asked = await asyncio.gather(*(self._ask(url, deadline) for url in to_ask))
        failures = []
        for (url, group), (answer, failing) in zip(to_ask.items(), asked, strict=True):
            if failing:
                failures.append(answer.problem or "")
            elif answer.problem is None:
                self._cache[url] = answer
            answers.update((address, answer) for address in group)
        self._note_health(loop.time(), failures, len(asked) - len(failures))
        return answers

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.close()

    async def _ask(self, url: str, deadline: float) -> tuple[CrmAnswer, bool]:
        """The answer for one URL, and whether it shows the CRM failing."""
        try:
            async with asyncio.timeout_at(deadline), self._http().get(url, allow_redirects=False) as response:
                body = await response.read()
            return CrmAnswer(self._read(response.status, response.reason, body)), False
        except TimeoutError:
            problem = f"the CRM gave no answer within {self.settings.timeout_seconds:g}s"
            return CrmAnswer(None, problem), True
        except aiohttp.ClientError as exc:
            return CrmAnswer(None, f"the CRM cannot be reached ({type(exc).__name__}: {exc})"), True
        except _CrmFailing as exc:
            return CrmAnswer(None, str(exc)), True
        except _UnusableAnswer as exc:
            return CrmAnswer(None, str(exc)), False

    def _read(self, status: int, reason: str | None, body: bytes) -> Organisation | None:
        if status == 404:
            return None
        if not 200 <= status < 300:
            raise _CrmFailing(f"the CRM answered HTTP {status} {reason or ''}".rstrip())
        try:
            data = json.loads(body)
        except ValueError:
            raise _CrmFailing("the CRM's answer is not JSON") from None
        fields = self.settings.fields
        record = _first(_at(data, fields.record) if fields.record else data)
        if record is None or record == {}:
            return None
        name = _text(record, fields.name)
        if not name:
            raise _UnusableAnswer(f"the CRM's answer has no name (field {fields.name!r})")
        tier = _text(record, fields.tier) if fields.tier else None
        manager = _text(record, fields.account_manager) if fields.account_manager else None
        return Organisation(name, tier.lower() if tier else None, manager.lower() if manager else None)

    def _http(self) -> aiohttp.ClientSession:
        # A session (and its pooled connections) belongs to one event loop; the CLI and the tests run several.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            settings = self.settings
            headers = dict(settings.headers)
            if settings.token is not None:
                secret = settings.token.get_secret_value()
                scheme = settings.token_scheme
                headers[settings.token_header] = f"{scheme} {secret}" if scheme else secret
            tls = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
            self._client = aiohttp.ClientSession(
                headers=headers,
                # The deadline of the whole batch (asyncio.timeout_at) is what counts; this is a backstop.
                timeout=aiohttp.ClientTimeout(total=settings.timeout_seconds),
                connector=aiohttp.TCPConnector(limit=settings.max_connections, ssl=tls),
                trust_env=True,  # HTTPS_PROXY / NO_PROXY, as curl would
            )
            self._client_loop = loop
        return self._client

    def _note_health(self, now: float, failures: list[str], answered: int) -> None:
        if failures:
            self._paused_until = now + self.settings.pause_after_failure_seconds
            if self._outage is None:
                self._outage = _Outage(datetime.now(UTC), failures[0])
                log.warning(
                    "CRM %s is failing (%s): new tickets are routed by the rules alone and flagged; "
                    "asking again in %gs",
                    self.host,
                    failures[0],
                    self.settings.pause_after_failure_seconds,
                )
            else:
                self._outage.problem = failures[0]
        elif answered and self._outage is not None:
            outage, self._outage = self._outage, None
            log.info(
                "CRM %s answers again (failing since %s; %d lookups skipped meanwhile)",
                self.host,
                outage.since.strftime("%H:%M:%S UTC"),
                outage.skipped,
            )

    def _not_asked(self, outage: _Outage) -> str:
        return f"the CRM was not asked: failing since {outage.since.strftime('%H:%M:%S UTC')} ({outage.problem})"

    def _expires(self, _url: str, answer: CrmAnswer, now: float) -> float:
        known = answer.organisation is not None
        return now + (self.settings.cache_seconds if known else self.settings.negative_cache_seconds)


def _at(data: Any, path: str) -> Any:
    for step in path.split("."):
        if isinstance(data, dict):
            data = data.get(step)
        elif isinstance(data, list) and step.isdigit():
            data = data[int(step)] if int(step) < len(data) else None
        else:
            return None
    return data


def _first(data: Any) -> dict[str, Any] | None:
    """The customer record: a search endpoint's list gives its first item; anything but an object is none."""
    if isinstance(data, list):
        data = data[0] if data else None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _UnusableAnswer(f"the CRM's answer is not a customer record but {type(data).__name__}")
    return data


def _text(record: dict[str, Any], path: str) -> str | None:
    value = _at(record, path)
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value).strip() or None
