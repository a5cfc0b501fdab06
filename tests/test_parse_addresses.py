"""Address headers of one plain mailbox are read by a regex (`_PLAIN_ADDRESS_HEADER`) instead of mail-parser:
on random headers, whenever the regex takes one, it must give what mail-parser gives (the same pairs, no
diagnostics); and the plain forms it is for must be taken."""

from __future__ import annotations

import base64
import itertools

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailbridge.ingest.parse import _PLAIN_ADDRESS_HEADER, _read_addresses, _read_any_addresses, _simple_mailboxes

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


# Names as customers' mailers send them: letters of several scripts, encoded in a charset that has them.
LETTERS = "abzABZąęłńóśźżĄĘŁŃÓŚŹŻжщяЖЩЯäöüßéè"
CHARSETS = ["utf-8", "UTF-8", "iso-8859-2", "windows-1250", "koi8-r", "windows-1251", "iso-8859-1", "utf8"]
name_word = st.text(LETTERS + "0189", min_size=1, max_size=8)
unicode_name = st.builds(
    lambda words, joins: "".join(w + j for w, j in zip(words, joins, strict=False)) + words[-1],
    st.lists(name_word, min_size=1, max_size=3),
    st.lists(st.sampled_from([" ", "-", "'"]), min_size=2, max_size=2),
)


@st.composite
def encoded_name(draw: st.DrawFn) -> str:
    name = draw(unicode_name)
    charset = draw(st.sampled_from(CHARSETS))
    try:
        name.encode(charset)
    except UnicodeEncodeError:
        charset = "utf-8"
    pieces = draw(st.integers(1, 3))
    while True:  # as mailers do: whole characters in each word, more words until each is at most 75 long
        cut = [len(name) * i // pieces for i in range(pieces + 1)]
        words = []
        for start, end in itertools.pairwise(cut):
            chunk = name[start:end].encode(charset)
            if not chunk:
                continue
            if draw(st.booleans()):
                words.append(f"=?{charset}?{draw(st.sampled_from('bB'))}?{base64.b64encode(chunk).decode()}?=")
            else:
                text = "".join(
                    "_" if b == 32 else chr(b) if chr(b).isalnum() and b < 128 else f"={b:02X}" for b in chunk
                )
                words.append(f"=?{charset}?{draw(st.sampled_from('qQ'))}?{text}?=")
        if all(len(word) <= 75 for word in words) or pieces >= len(name):
            break
        pieces += 1
    return draw(st.sampled_from([" ", "\n ", "\r\n\t", "  "])).join(w for w in words if w)


encoded_mailbox = st.builds(lambda n, sep, a: f"{n}{sep}<{a}>", encoded_name(), st.sampled_from([" ", "\n "]), address)
mailbox_list = st.lists(plain_headers | encoded_mailbox, min_size=1, max_size=4).flatmap(
    lambda items: st.sampled_from([", ", ",\n ", ",", " , "]).map(lambda sep: sep.join(items))
)


@st.composite
def mutated_list(draw: st.DrawFn) -> str:
    text = draw(mailbox_list)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(NOISE + ALNUM + "?=", min_size=1, max_size=3)) + text[at:]
    return text


@settings(max_examples=2000, deadline=None)
@given(mailbox_list | mutated_list())
@example("=?utf-8?q?Zofia_W=C3=B3jcik?= <z.wojcik@budserwis.example>")
@example("=?windows-1251?b?wOvl6vHg7eTwIMLg8ejr/OXi?=\n <aleksandr.vasilev@logistik-center.example>")
@example("=?x-unknown?q?Jan?= <jan@x.example>")
@example("=?utf-8?b?SmFu?==?utf-8?b?SmFu?= <jan@x.example>")
@example("=?utf-8?q?Jan=?= <jan@x.example>")
@example("=?utf-8?q?O'Brien?= <o@x.example>")
@example("Jan <jan@x.example>,")
def test_what_the_common_forms_take_mail_parser_reads_the_same(text: str) -> None:
    pairs = _simple_mailboxes(text)
    if pairs is not None:
        assert (pairs, ()) == _read_any_addresses(text)


@settings(max_examples=500, deadline=None)
@given(mailbox_list)
def test_lists_and_encoded_names_are_taken_without_mail_parser(text: str) -> None:
    labels = [item.strip().rstrip(">").rsplit("@", 1)[1].split(".") for item in text.split(",")]
    if any(label.startswith("-") or label.endswith("-") for item in labels for label in item):
        return  # not in the plain form (mail-parser reads it)
    assert _simple_mailboxes(text) is not None
