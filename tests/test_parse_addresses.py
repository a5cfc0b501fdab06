"""Address headers of one plain mailbox are read by a regex (`_PLAIN_ADDRESS_HEADER`) instead of mail-parser:
on random headers, whenever the regex takes one, it must give what mail-parser gives (the same pairs, no
diagnostics); and the plain forms it is for must be taken."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailbridge.ingest.parse import _PLAIN_ADDRESS_HEADER, _read_addresses, _read_any_addresses

ALNUM = "abcxyzABCXYZ0189"
word = st.text(ALNUM, min_size=1, max_size=6)
local_atom = st.text(ALNUM + "_+-", min_size=1, max_size=6)
label = st.text(ALNUM + "-", min_size=1, max_size=6)
address = st.builds(
    lambda local, domain: ".".join(local) + "@" + ".".join(domain),
    st.lists(local_atom, min_size=1, max_size=3),
    st.lists(label, min_size=1, max_size=3),
)
name = st.lists(word, min_size=1, max_size=4).map(" ".join)
plain_headers = address | address.map(lambda a: f"<{a}>") | st.builds(lambda n, a: f"{n} <{a}>", name, address)
# What lies next to a plain header in real mail: quotes, comments, dots and spaces in names, lists, encoded
# words, other scripts, broken brackets.
NOISE = " \t\r\n.\"'(),;:<>@[]\\=?_-+éжż\x00"


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(plain_headers)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(NOISE + ALNUM, min_size=1, max_size=3)) + text[at:]
    return text


@settings(max_examples=1500, deadline=None)
@given(plain_headers | mutated())
@example("Jan <jan@-x.example>")  # a label that starts with a hyphen: left to mail-parser
@example("Jan <jan..k@x.example>")
@example("Jan  Kowalski <jan@x.example>")
@example("J. Smith <j@x.example>")
@example("a" * 100 + "@x.example")  # longer than RFC 5321 allows: mail-parser does not object either
@example("Jan <" + "a" * 70 + "@" + "b" * 70 + ".example>")
@example("J " * 200 + "<a@b.c>")
@example("Jan <a@1.2.3.4>")
def test_what_the_regex_takes_mail_parser_reads_the_same(text: str) -> None:
    if _PLAIN_ADDRESS_HEADER.fullmatch(text) is not None:
        assert _read_addresses(text) == _read_any_addresses(text)


@settings(max_examples=500, deadline=None)
@given(plain_headers)
def test_plain_headers_are_taken_by_the_regex(text: str) -> None:
    labels = text.rstrip(">").rsplit("@", 1)[1].split(".")
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return  # not in the plain form (mail-parser reads it; the regex leaves it)
    assert _PLAIN_ADDRESS_HEADER.fullmatch(text) is not None
    pairs, reasons = _read_any_addresses(text)
    assert reasons == () and len(pairs) == 1
