"""The parse results cross from the parser workers to the daemon pickled by their fields
(`pickled_by_fields`): random results and the parsed fixtures come back equal, field by field, to what
the dataclasses' own pickling (the code before) gives back."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.ingest.mail import Address, DeliveryReport, ParsedMail, ParseFailure, Part
from mailbridge.ingest.parse import ParseError, parse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates and NUL included
maybe_text = st.none() | text
addresses = st.builds(Address, text, text)
parts = st.builds(
    Part, text, text, st.integers(0, 2**40), text, maybe_text, st.booleans(), st.none() | st.binary(max_size=30)
)
reports = st.builds(
    DeliveryReport,
    maybe_text,
    st.booleans(),
    st.tuples(text),
    st.lists(text, max_size=3).map(tuple),
    st.lists(text, max_size=3).map(tuple),
)
dates = st.none() | st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))]))
mails = st.builds(
    ParsedMail,
    subject=text,
    sender=st.none() | addresses,
    to=st.lists(addresses, max_size=4).map(tuple),
    cc=st.lists(addresses, max_size=2).map(tuple),
    reply_to=st.lists(addresses, max_size=2).map(tuple),
    date=dates,
    message_id=maybe_text,
    in_reply_to=maybe_text,
    references=st.lists(text, max_size=4).map(tuple),
    text=text,
    html=maybe_text,
    attachments=st.lists(parts, max_size=3).map(tuple),
    body_parts=st.integers(0, 50),
    defects=st.lists(text, max_size=3).map(tuple),
    headers=st.lists(st.tuples(text, text), max_size=6).map(tuple),
    raw_sha256=text,
    raw_size=st.integers(0, 2**40),
    dedup_key=text,
    report=st.none() | reports,
    new_text=maybe_text,
    routing=st.none() | st.just({"queue": "billing"}),
)
failures = st.builds(ParseFailure, text, text)


def _as_before(value: Any) -> Any:
    """What the dataclasses' own pickling carries: the class and the field values in order, nested."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), [_as_before(getattr(value, f.name)) for f in dataclasses.fields(value)])
    if isinstance(value, tuple):
        return tuple(_as_before(item) for item in value)
    return (type(value), value)


def _round_trip(value: Any, protocol: int) -> Any:
    back = pickle.loads(pickle.dumps(value, protocol=protocol))
    assert back == value
    assert _as_before(back) == _as_before(value)
    return back


@settings(max_examples=300, deadline=None)
@given(st.lists(mails | failures, max_size=5), st.integers(2, pickle.HIGHEST_PROTOCOL))
def test_random_parse_results_come_back_as_they_went(results: list[ParsedMail | ParseFailure], protocol: int) -> None:
    back = _round_trip(results, protocol)
    for before, after in zip(results, back, strict=True):
        assert type(after) is type(before)
        if isinstance(before, ParseFailure):
            assert after.retryable == before.retryable


@settings(max_examples=100, deadline=None)
@given(mails)
def test_the_pickle_holds_what_the_dataclass_pickle_held(mail: ParsedMail) -> None:
    """Both ways carry the same values: read with the old way's state, a new pickle gives the same object."""
    old_state = [getattr(mail, f.name) for f in dataclasses.fields(mail)]
    rebuilt = object.__new__(ParsedMail)
    for f, value in zip(dataclasses.fields(mail), old_state, strict=True):
        object.__setattr__(rebuilt, f.name, value)
    assert pickle.loads(pickle.dumps(mail)) == rebuilt


def test_the_parsed_fixtures_come_back_as_they_went() -> None:
    files = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.suffix in (".eml", ".msg", ""))
    parsed = []
    for path in files:
        try:
            parsed.append(parse(path.read_bytes()).without_payloads())
        except ParseError:
            continue
    assert len(parsed) > 20
    for protocol in (2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL):
        _round_trip(parsed, protocol)
