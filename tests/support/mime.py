"""A comparable picture of a parsed MIME tree."""

from __future__ import annotations

import email.message


def mime_tree(message: email.message.Message) -> list[tuple[object, ...]]:
    """Every part's stored payload (before any decoding), preamble, epilogue, defects and headers."""
    return [
        (
            part._payload if isinstance(part._payload, str) else None,  # type: ignore[attr-defined]
            part.preamble,
            part.epilogue,
            [type(defect) for defect in part.defects],
            part.items(),
        )
        for part in message.walk()
    ]
