"""Pure pieces: no server, no database."""

from __future__ import annotations

import asyncio
import email
import random
import re

import aioimaplib
import pytest

from mailbridge.config import FetchSettings
from mailbridge.ingest.html_text import html_to_text
from mailbridge.ingest.imap import _batches
from mailbridge.ingest.imap_client import _FetchCommand, _Protocol, _search_uids, imap_utf7, uid_set
from mailbridge.ingest.ledger import FolderCount, Receipted, count_folder
from mailbridge.ingest.mime_parser import BoundaryLine, compile_pattern
from mailbridge.ingest.parse import decode_header_value, decode_text, dedup_key, parse, safe_filename


@pytest.mark.parametrize(
    ("uids", "expected"),
    [([], ""), ([5], "5"), ([1, 2, 3], "1:3"), ([3, 1, 2, 7, 9, 10], "1:3,7,9:10"), ([4, 4, 5], "4:5")],
)
def test_uid_set(uids: list[int], expected: str) -> None:
    assert uid_set(uids) == expected


def test_batches_respect_count_and_bytes() -> None:
    settings = FetchSettings(batch_size=3, batch_bytes=10_000)
    sizes = {1: 100, 2: 100, 3: 100, 4: 100, 5: 9_950, 6: 20_000, 7: 1}
    assert list(_batches([1, 2, 3, 4, 5, 6, 7], sizes, settings)) == [[1, 2, 3], [4], [5], [6], [7]]


def test_search_response_parsing() -> None:
    assert _search_uids([b"1 2 30", b"Search completed."]) == [1, 2, 30]
    assert _search_uids([b"SEARCH 4 5", b"done"]) == [4, 5]
    assert _search_uids([b"", b"Search completed."]) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd\x07.txt", "passwd.txt"),
        ("C:\\Users\\x\\invoice.pdf", "invoice.pdf"),
        ("..", ""),
        (".hidden", "hidden"),
        ("fak\u200btura.pdf", "faktura.pdf"),
        ("a" * 300 + ".pdf", "a" * 196 + ".pdf"),
        ("Zażółć.docx", "Zażółć.docx"),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name) == expected


def test_decode_text_fallbacks() -> None:
    defects: list[str] = []
    polish = "Zażółć gęślą jaźń".encode()
    assert decode_text(polish, "us-ascii", defects) == "Zażółć gęślą jaźń"
    assert decode_text(polish, "iso-8859-1", defects) == "Zażółć gęślą jaźń"
    assert decode_text("Zażółć".encode("iso-8859-2"), "iso-8859-2", defects) == "Zażółć"
    russian = "Здравствуйте, у меня не работает принтер в офисе".encode("cp1251")
    assert decode_text(russian, None, defects) == "Здравствуйте, у меня не работает принтер в офисе"
    assert decode_text(b"plain", "x-unknown-charset", defects) == "plain"
    # Too short for statistics: the charset that reads as words wins.
    assert decode_text("тест тест".encode("koi8-r"), None, defects) == "тест тест"
    assert decode_text("Zażółć".encode("iso-8859-2"), None, defects) == "Zażółć"
    assert decode_text("Привет".encode("cp1251"), None, defects) == "Привет"
    assert decode_text("Café crème".encode("cp1252"), None, defects) == "Café crème"
    assert any("CharsetMismatch" in d for d in defects)


def test_decode_header_value_raw_8bit_and_encoded_words() -> None:
    assert decode_header_value("=?utf-8?q?Zg=C5=82oszenie?= nr 5") == "Zgłoszenie nr 5"
    raw = email.message_from_bytes("Subject: Reklamacja zamówienia\n\nx".encode())
    assert decode_header_value(raw["Subject"]) == "Reklamacja zamówienia"


def test_html_to_text_keeps_structure_and_drops_scripts() -> None:
    text = html_to_text(
        "<html><head><style>p{}</style></head><body><p>Hello <b>there</b></p><script>alert(1)</script>"
        "<ul><li>one</li><li>two</li></ul><a href='https://x.example/a'>link</a></body></html>"
    )
    assert text == "Hello there\n\n- one\n\n- two\n\nlink <https://x.example/a>"


def _mail(extra_headers: str = "", body: str = "Body\n", message_id: str = "<a@b>") -> bytes:
    return (
        f"{extra_headers}From: a@example.com\nDate: Mon, 2 Mar 2026 10:00:00 +0100\nSubject: s\n"
        f"Message-ID: {message_id}\n\n{body}"
    ).encode()


def test_dedup_key_same_mail_through_two_mailboxes() -> None:
    first = parse(_mail("Received: by mx1\nDelivered-To: support@x\n"))
    second = parse(_mail("Received: by mx2\nDelivered-To: sales@x\n").replace(b"\n", b"\r\n"))
    assert first.dedup_key == second.dedup_key
    assert first.raw_sha256 != second.raw_sha256


def test_dedup_key_differs_when_a_mailer_reuses_a_message_id() -> None:
    assert parse(_mail(body="first\n")).dedup_key != parse(_mail(body="second\n")).dedup_key


def test_dedup_key_depends_on_the_authors_headers() -> None:
    message = email.message_from_bytes(_mail())
    other = email.message_from_bytes(_mail().replace(b"Subject: s", b"Subject: t"))
    assert dedup_key(message, "a@b", "Body", None, ()) == dedup_key(message, "a@b", "Body", None, ())
    assert dedup_key(message, "a@b", "Body", None, ()) != dedup_key(other, "a@b", "Body", None, ())
    assert dedup_key(message, "a@b", "Body", None, ()) != dedup_key(message, "c@d", "Body", None, ())


def test_references_in_reply_to_first_then_newest() -> None:
    mail = parse(b"From: a@example.com\nSubject: Re: x\nIn-Reply-To: <c@x>\nReferences: <a@x> <b@x>\n <c@x>\n\nhi\n")
    assert mail.in_reply_to == "c@x"
    assert mail.references == ("c@x", "b@x", "a@x")


def test_leading_from_line_and_bom_are_tolerated() -> None:
    mail = parse(b"\xef\xbb\xbfFrom: Jan <jan@example.com>\nSubject: BOM\n\nhi\n")
    assert mail.sender is not None and mail.sender.address == "jan@example.com"
    mail = parse(b"---- Original message ----\nFrom: jan@example.com\nSubject: forwarded\n\nhi\n")
    assert mail.subject == "forwarded"


def test_a_uid_without_a_body_blocks_only_until_it_is_given_up() -> None:
    from mailbridge.ingest.imap import UNDELIVERABLE_AFTER, ImapWatcher

    watcher = ImapWatcher.__new__(ImapWatcher)
    watcher._strikes = {}
    watcher.box = type("Box", (), {"name": "support"})()  # type: ignore[assignment]
    for _ in range(UNDELIVERABLE_AFTER - 1):
        assert watcher._missing(7, [1, 2, 3], {1: b"a", 3: b"c"}) == [2]
    bodies = {1: b"a", 3: b"c"}
    assert watcher._missing(7, [1, 2, 3], bodies) == []
    assert bodies[2] == b""  # recorded as an empty mail: quarantined and moved aside


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("INBOX", "INBOX"),
        ("Wysłane", "Wys&AUI-ane"),
        ("A & B", "A &- B"),
        ("Отправленные", "&BB4EQgQ,BEAEMAQyBDsENQQ9BD0ESwQ1-"),
    ],
)
def test_folder_names_in_modified_utf7(name: str, encoded: str) -> None:
    assert imap_utf7(name) == encoded


def _receipted(uids: set[int], high_water: int, baseline: int = 0, initial_done: bool = True) -> Receipted:
    return Receipted(uids=frozenset(uids), high_water=high_water, baseline_uid=baseline, initial_done=initial_done)


def test_folder_count_after_a_drain_with_flag_seen() -> None:
    # 1-3 imported and kept in the folder; 4 has no receipt though 5 has: passed over; 6 arrived since.
    count = count_folder([1, 2, 3, 4, 5, 6], _receipted({1, 2, 3, 5}, high_water=5), set())
    assert count == FolderCount(in_folder=6, waiting=1, missing=1, left_by_existing_mail=0)


def test_folder_count_of_the_mail_there_before_the_first_run() -> None:
    # UIDs up to 10 were there at the first run; `existing_mail` imports 8-10 (`since`) and left 1-7.
    wanted = {8, 9, 10}
    during = count_folder(range(1, 13), _receipted({8}, high_water=8, baseline=10, initial_done=False), wanted)
    assert during == FolderCount(in_folder=12, waiting=4, missing=0, left_by_existing_mail=7)  # 9, 10, 11, 12
    after = count_folder(range(1, 13), _receipted({8, 10, 11, 12}, high_water=12, baseline=10), wanted)
    assert after == FolderCount(in_folder=12, waiting=0, missing=1, left_by_existing_mail=7)  # 9 was passed over


def test_folder_count_of_an_empty_folder() -> None:
    assert count_folder([], _receipted(set(), high_water=40), set()) == FolderCount(0, 0, 0, 0)


BOUNDARY_SEPARATORS = [
    "--simple",
    "--=_Part_0_1234.5678",
    "--(a)[b]{c}?*+|^$.&~# \t\\x\\\\y",  # every character re.escape escapes, a backslash pair
    "--_973899884_21582011171913502220_",
]


@pytest.mark.parametrize("separator", BOUNDARY_SEPARATORS)
def test_boundary_matcher_answers_as_the_feed_parsers_regex(separator: str) -> None:
    stdlib = re.compile("(?P<sep>" + re.escape(separator) + r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$")
    ours = compile_pattern(stdlib.pattern)
    assert isinstance(ours, BoundaryLine)
    assert ours.separator == separator
    tails = ["", "\n", "\r\n", "\r", "--", "--\n", "--\r\n", "  \t\r\n", "-- \n", "x\n", "--x\n", " x", "\n\n", "---\n"]
    for line in [separator + tail for tail in tails] + [separator[:-1] + "\n", "prefix" + separator + "\n", ""]:
        expected, got = stdlib.match(line), ours.match(line)
        assert (got is None) == (expected is None), repr(line)
        if expected is not None and got is not None:
            assert [got.group(g) for g in ("end", "ws", "linesep")] == [
                expected.group(g) for g in ("end", "ws", "linesep")
            ], repr(line)
            assert got.end() == expected.end()


def test_mime_parser_uses_its_own_feedparser_copy_and_leaves_the_stdlib_alone() -> None:
    import email.feedparser

    from mailbridge.ingest import mime_parser

    assert mime_parser._feedparser is not email.feedparser  # the fast path is in use
    assert vars(email.feedparser)["re"] is re
    assert compile_pattern("a+b") == re.compile("a+b")  # any other pattern: plain re
    raw = (
        b'Content-Type: multipart/mixed; boundary="(b+)"\n\npre\n--(b+)\nContent-Type: text/plain\n\nhello\n'
        b"--(b+)--\nepilogue\n"
    )
    ours, stdlib = mime_parser.message_from_bytes(raw), email.message_from_bytes(raw)
    assert [p.get_payload() for p in ours.walk()][1:] == [p.get_payload() for p in stdlib.walk()][1:] == ["hello"]
    assert (ours.preamble, ours.epilogue) == (stdlib.preamble, stdlib.epilogue) == ("pre", "epilogue\n")


def test_an_address_header_read_again_gives_the_same_addresses_and_defects() -> None:
    """Address headers are remembered per worker; a mail whose header was seen before must still get
    that header's defects, and nothing of the previous mail."""
    headers = b'From: Anna anna@x.example, <bob@y.example\r\nTo: "Support <support@x.example>\r\n'
    first = parse(headers + b"Subject: one\r\n\r\nbody\r\n")
    second = parse(headers + b"Subject: two\r\n\r\nbody\r\n")
    assert first.sender is not None and first.sender.address == "anna@x.example"
    assert first.defects == (
        "AddressHeaderDefect: from: invalid-or-ambiguous-address",
        "AddressHeaderDefect: from: unclosed-delimiter",
        "AddressHeaderDefect: to: unclosed-delimiter",
    )
    assert (second.sender, second.to, second.defects) == (first.sender, first.to, first.defects)
    clean = parse(b"From: anna@x.example\r\nTo: support@x.example\r\nSubject: three\r\n\r\nbody\r\n")
    assert clean.defects == ()


async def test_fetch_command_knows_when_a_message_is_complete_as_aioimaplib_does() -> None:
    """Our FetchCommand remembers the lines it has looked at; after every line it answers what aioimaplib's
    own wait_data answers, over random FETCH responses (literals, nested parentheses, split lines)."""
    rng = random.Random(20261201)
    pieces: list[bytes | bytearray] = [
        b"* 1 FETCH (UID 7 BODY[] {12}",
        b"* 22 FETCH (UID 8 FLAGS (\\Seen) BODY[] {3}",
        b"* 3 FETCH (UID 9 RFC822.SIZE 120)",
        bytearray(b"(literal) ("),
        b")",
        b" FLAGS (\\Seen))",
        b"(",
        b"* 4 EXISTS",
        b"",
    ]
    changed = 0
    for _ in range(300):
        ours = _FetchCommand("A1", "1:*", "(UID BODY.PEEK[])", prefix="UID")
        theirs = aioimaplib.FetchCommand("A1", "1:*", "(UID BODY.PEEK[])", prefix="UID")
        answers = []
        for _ in range(rng.randint(1, 40)):
            piece = rng.choice(pieces)
            ours.append_to_resp(piece)
            theirs.append_to_resp(piece)
            assert ours.wait_data() == theirs.wait_data()
            if rng.random() < 0.3:  # asked twice between two lines, as aioimaplib does
                assert ours.wait_data() == theirs.wait_data()
            answers.append(theirs.wait_data())
        changed += len(set(answers)) > 1
    assert changed > 100  # the responses do open and close messages


def _fetch_response(rng: random.Random) -> bytes:
    """A FETCH response as servers send it: literals of every size (empty, holding CRLF, ")" and "{5}"),
    other data items before and after them, untagged lines between messages, then the tagged OK."""
    out = []
    for number in range(1, rng.randint(1, 12)):
        body = rng.choice([b"", b"x", b"Subject: a\r\n\r\n(body) {5}\r\n)", rng.randbytes(rng.randint(0, 3000))])
        flags = rng.choice([b"", b" FLAGS (\\Seen)"])
        out.append(
            b"* %d FETCH (UID %d%s BODY[] {%d}\r\n%s%s)\r\n" % (number, number + 100, flags, len(body), body, flags)
        )
        if rng.random() < 0.2:
            out.append(b"* %d EXISTS\r\n" % (number + 50))
    return b"".join(out) + b"A1 OK Fetch completed.\r\n"


async def test_imap_responses_read_by_offsets_as_aioimaplib_reads_them() -> None:
    """Our protocol walks a received chunk by offsets; fed the same chunks as aioimaplib's own protocol,
    it gives every command the same lines and literals, whatever the chunks' boundaries (in a literal, in
    its "{n}" or in a CRLF)."""
    loop = asyncio.get_running_loop()
    rng = random.Random(20261201)
    for _ in range(300):
        data = _fetch_response(rng)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        responses = []
        for protocol_class in (aioimaplib.IMAP4ClientProtocol, _Protocol):
            protocol = protocol_class(loop, None)
            protocol.state = aioimaplib.SELECTED
            command = aioimaplib.FetchCommand("A1", "1:*", "(UID BODY.PEEK[])", prefix="UID", loop=loop)
            protocol.pending_async_commands["FETCH"] = command
            for chunk in chunks:
                protocol.data_received(chunk)
            responses.append((command.response.result, [bytes(line) for line in command.response.lines]))
        assert responses[0] == responses[1], chunks
        assert responses[1][0] == "OK"
