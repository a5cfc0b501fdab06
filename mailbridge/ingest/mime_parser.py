"""The standard library's MIME parser, minus one cost: a regex compiled for every multipart.

`email.feedparser` compiles `(?P<sep>--BOUNDARY)(?P<end>--)?…$` for each multipart it meets. Every
mail has its own boundary, so `re`'s cache never hits and each compile costs ~0.25 ms in Python code
(`re._parser`): about a tenth of our whole parse. Here a private copy of `email.feedparser` gets a
`re` whose `compile` answers that one pattern with an equivalent matcher (a `startswith` and one regex
compiled once); every other pattern, and the stdlib module itself, stay as they are. Where the copy
cannot be made, or the stdlib writes that pattern differently, the stock parser and `re` are used.
"""

from __future__ import annotations

import email.feedparser
import email.message
import importlib.util
import re
from email._policybase import compat32  # as email.parser imports it; email.policy would load the header registry
from types import ModuleType
from typing import Any

# How Python 3.8 to 3.13 build the pattern: "(?P<sep>" + re.escape(separator) + _TAIL.
_HEAD = "(?P<sep>"
_TAIL = r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
_AFTER_SEPARATOR = re.compile(_TAIL[1:])
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)  # re.escape only ever puts a backslash before a character


class BoundaryLine:
    """Matches a line exactly as the compiled boundary pattern would, group names included."""

    __slots__ = ("separator",)

    def __init__(self, separator: str) -> None:
        self.separator = separator

    def match(self, line: str) -> re.Match[str] | None:
        if not line.startswith(self.separator):
            return None
        return _AFTER_SEPARATOR.match(line, len(self.separator))


def compile_pattern(pattern: Any, flags: int = 0) -> Any:
    """`re.compile`, except for the feed parser's boundary pattern."""
    if flags == 0 and isinstance(pattern, str) and pattern.startswith(_HEAD) and pattern.endswith(_TAIL):
        return BoundaryLine(_ESCAPED.sub(r"\1", pattern[len(_HEAD) : -len(_TAIL)]))
    return re.compile(pattern, flags)


class _ReForFeedparser(ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)


def _feedparser_copy() -> Any:
    source = getattr(email.feedparser, "__file__", None)
    spec = importlib.util.spec_from_file_location("mailbridge.ingest._feedparser", source) if source else None
    if spec is None or spec.loader is None:
        return email.feedparser
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # an unusual installation (no sources): the stock parser
        return email.feedparser
    shim = _ReForFeedparser("re")
    shim.compile = compile_pattern  # type: ignore[attr-defined]
    module.re = shim  # type: ignore[attr-defined]
    return module


_feedparser = _feedparser_copy()


def message_from_bytes(raw: bytes) -> email.message.Message:
    """What `email.message_from_bytes(raw)` returns (the compat32 policy), built by the copy."""
    parser = _feedparser.FeedParser(policy=compat32)
    parser.feed(raw.decode("ascii", "surrogateescape"))
    message: email.message.Message = parser.close()
    return message
