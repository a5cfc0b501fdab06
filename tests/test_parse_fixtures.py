"""Golden pairs: fixtures/emails/<case>.eml with <case>.expected.yaml."""

from __future__ import annotations

import base64
import email
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailbridge.ingest.parse import _base64_payload, _payload_bytes, message_from_bytes, parse, shorten_base64_runs
from tests.support.mime import mime_tree

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "emails"
CASES = sorted(p.stem for p in FIXTURES.glob("*.eml"))


def expected(case: str) -> dict[str, Any]:
    return yaml.safe_load((FIXTURES / f"{case}.expected.yaml").read_text(encoding="utf-8"))


def leaf_count(raw: bytes) -> int:
    """Leaves of the MIME tree by an independent walk (an attached message counts as one leaf)."""

    def count(part: email.message.Message) -> int:
        if part.is_multipart() and not part.get_content_type().startswith("message/"):
            return sum(count(child) for child in part.get_payload())
        return 1

    return count(email.message_from_bytes(raw))


def test_every_fixture_has_an_expectation() -> None:
    assert CASES, "no fixtures found"
    for case in CASES:
        assert (FIXTURES / f"{case}.expected.yaml").exists(), case


@pytest.mark.parametrize("case", CASES)
def test_fixture_parses_as_expected(case: str) -> None:
    raw = (FIXTURES / f"{case}.eml").read_bytes()
    want = expected(case)
    mail = parse(raw)
    if "subject" in want:
        assert mail.subject == want["subject"]
    if want.get("from_address"):
        assert mail.sender is not None
        assert mail.sender.address.lower() == want["from_address"].lower()
    for needle in want.get("text_contains") or []:
        assert needle in mail.text, f"{needle!r} missing from the text body"
    got = [(a.content_type, a.inline) for a in mail.attachments]
    assert got == [(a["content_type"], bool(a["inline"])) for a in want.get("attachments") or []]
    for part, spec in zip(mail.attachments, want.get("attachments") or [], strict=True):
        if spec.get("filename"):
            assert part.filename == spec["filename"]
        if spec.get("content_id"):
            assert part.content_id == spec["content_id"]
        assert part.filename and "/" not in part.filename and "\\" not in part.filename
        assert not any(ord(c) < 32 for c in part.filename)
    assert "\ufffd" not in mail.text, "mojibake: replacement characters in the text"


@pytest.mark.parametrize("case", CASES)
def test_no_mime_part_is_lost(case: str) -> None:
    raw = (FIXTURES / f"{case}.eml").read_bytes()
    mail = parse(raw)
    assert mail.body_parts + len(mail.attachments) == leaf_count(raw)


def _attachment_mail(body_lines: list[bytes], eol: bytes = b"\r\n", after: bytes = b"") -> bytes:
    lines = [
        b"From: a@example.com",
        b"Subject: files",
        b'Content-Type: multipart/mixed; boundary="b1"',
        b"",
        b"--b1",
        b"Content-Type: text/plain",
        b"",
        b"see attached",
        b"--b1",
        b"Content-Type: application/octet-stream",
        b"Content-Transfer-Encoding: base64",
        b"",
        *body_lines,
        b"--b1--",
        b"",
    ]
    return eol.join(lines) + after


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
@pytest.mark.parametrize("extra", [b"", b"\x00"])
def test_fast_mime_reading_keeps_every_payload_exact(eol: bytes, extra: bytes) -> None:
    payload = bytes(range(256)) * 40
    encoded = base64.encodebytes(payload).splitlines()
    raw = _attachment_mail(encoded, eol, after=extra)
    fast = message_from_bytes(raw)
    assert mime_tree(fast) == mime_tree(email.message_from_bytes(raw))
    attachment = fast.get_payload()[1]
    assert attachment.get_payload(decode=True) == payload
    # The last base64 line before a boundary keeps its place: the line break before "--b1" is the boundary's.
    assert attachment.get_payload().endswith(encoded[-1].decode())


def test_fixtures_fast_mime_reading_gives_the_stdlib_tree() -> None:
    for case in CASES:
        raw = (FIXTURES / f"{case}.eml").read_bytes()
        assert mime_tree(message_from_bytes(raw)) == mime_tree(email.message_from_bytes(raw)), case


# The definition of a base64 run, written plainly (the shortcut's regex is written for speed).
_PLAIN_BASE64_RUN = re.compile(rb"^(?:[A-Za-z0-9+/=]{40,}\r?\n){7,}[A-Za-z0-9+/=]{40,}(?=\r?\n)", re.MULTILINE)


def _plain_shortening(raw: bytes) -> tuple[bytes, list[bytes]]:
    """`shorten_base64_runs` by the plain definition."""
    runs: list[bytes] = []

    def token(match: re.Match[bytes]) -> bytes:
        runs.append(match.group())
        return b"\x00mb%d\x00" % (len(runs) - 1)

    return _PLAIN_BASE64_RUN.sub(token, raw), runs


def _random_lines(rng: random.Random) -> bytes:
    """Runs of base64-like lines of the lengths around the limit, broken up by blank lines, lines that go on
    after their base64 characters, stray CRs and text, with LF, CRLF, CR CR LF or no line end."""
    lines = []
    eol = rng.choice([b"\n", b"\r\n"])
    for _ in range(rng.randint(0, 20)):
        kind = rng.random()
        if kind < 0.8:
            line = bytes(rng.choice(b"Ab0+/=") for _ in range(rng.choice([39, 40, 41, 76, 76, 76])))
        elif kind < 0.85:
            line = bytes(rng.choice(b"Ab0+/=") for _ in range(45)) + rng.choice([b" x", b"\r", b"-"])
        elif kind < 0.9:
            line = b""
        else:
            line = bytes(rng.choice(b"ABCab09+/=- :\r\n") for _ in range(rng.randint(0, 60)))
        lines.append(line + (eol if rng.random() < 0.9 else rng.choice([b"\n", b"\r\n", b"\r\r\n", b""])))
    return b"".join(lines)


def test_fast_mime_reading_finds_the_base64_runs_of_the_plain_definition() -> None:
    rng = random.Random(20261201)
    with_runs = at_start = 0
    for _ in range(3000):
        raw = _random_lines(rng)
        shortened, plain_runs = _plain_shortening(raw)
        assert shorten_base64_runs(raw) == (shortened, plain_runs), raw
        with_runs += bool(plain_runs)
        at_start += bool(plain_runs) and raw.startswith(plain_runs[0])
    assert with_runs > 150  # the generator does make runs, at the start of the input too
    assert at_start > 30


def _long_regular_lines(rng: random.Random) -> bytes:
    """Attachments as encoders write them (up to 3,000 lines of one length, 64 KB and more; now and then a few
    very long lines), with a few lines changed anywhere: shorter, longer, too short, another line end, a stray
    character, a blank line."""
    length = rng.choice([40, 64, 72, 76, 76, 76, 100, 5000])  # 5,000: longer than the stretch templates serve
    eol = rng.choice([b"\n", b"\r\n"])
    count = rng.randint(1, 3000 if length < 1000 else 60)
    lines = [bytes(rng.choice(b"Ab0+/=") for _ in range(length)) for _ in range(count)]
    for _ in range(rng.randint(0, 4)):
        at = rng.randrange(len(lines))
        lines[at] = rng.choice(
            [lines[at][: rng.randint(0, length)], lines[at] + b"AAAA", lines[at][:39], lines[at] + b"\r", b"", b"-"]
        )
    body = b"".join(line + (eol if rng.random() < 0.999 else rng.choice([b"\n", b"\r\n", b"\r\r\n"])) for line in lines)
    return rng.choice([b"", b"Content-Transfer-Encoding: base64\r\n\r\n"]) + body + rng.choice([b"", b"--b--\r\n"])


def test_base64_runs_of_whole_attachments_are_found_as_the_plain_definition_finds_them() -> None:
    rng = random.Random(20261202)
    long_runs = 0
    for _ in range(150):
        raw = _long_regular_lines(rng)
        shortened, plain_runs = _plain_shortening(raw)
        assert shorten_base64_runs(raw) == (shortened, plain_runs)
        long_runs += any(len(run) > 1 << 16 for run in plain_runs)
    assert long_runs > 25  # longer than one stretch of the comparison


def _random_base64_body(rng: random.Random) -> bytes:
    """Base64 of random bytes as mailers write it (76-character lines, CRLF or LF), often broken the ways
    real mails break it: padding cut off or doubled, stray characters and spaces, "=" inside, a cut line,
    8-bit bytes, CR CR LF."""
    encoded = base64.encodebytes(rng.randbytes(rng.choice([0, 1, 2, 3, 57, 300, 2000])))
    body = bytearray(encoded.replace(b"\n", rng.choice([b"\r\n", b"\n"])))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        at = rng.randint(0, len(body))
        body[at:at] = rng.choice([b"=", b"==", b" ", b"-", b"\r", b"\r\r\n", b"\xe9", b"*", b"A", b"AB"])
    if body and rng.random() < 0.2:
        del body[rng.randint(0, len(body) - 1)]
    return bytes(body.rstrip(b"=") if rng.random() < 0.1 else body)


def test_base64_bodies_decode_as_the_stdlib_decodes_them() -> None:
    """The SIMD decoder takes only what the stdlib's strict first try would take; every body gives the
    stdlib's bytes."""
    rng = random.Random(20261201)
    taken = 0
    for _ in range(3000):
        body = _random_base64_body(rng)
        raw = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body
        ours, stdlib = email.message_from_bytes(raw), email.message_from_bytes(raw)
        taken += _base64_payload(ours) is not None
        assert _payload_bytes(ours) == stdlib.get_payload(decode=True), body
    assert 1000 < taken < 2900  # both ways are taken: the fast one and the stdlib's recovery
