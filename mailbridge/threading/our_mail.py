"""Mail that answers or returns one of our own mails: a bounce of an acknowledgement, an out-of-office reply
to a status mail. Found by the Message-IDs we generated (In-Reply-To, References, and the headers a bounce
returns); such a mail belongs to the ticket our mail was about and never opens a ticket of its own.

Replies from people (with the follow-up checks that keep strangers out of a ticket) are threaded by the
threading stage proper; this module only recognises our own Message-IDs, which nobody can forge into a
ticket because the mail that carries them gets no answer and changes no status.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from mailbridge.ingest.mail import ParsedMail
from mailbridge.models import OutboxMail
from mailbridge.notify.outbox import find_by_message_ids
from mailbridge.threading.resolve import referenced_ids


def find_our_mails(session: Session, mails: Sequence[ParsedMail]) -> list[OutboxMail | None]:
    """For each mail, the outbox mail it answers or returns, if any."""
    wanted = [referenced_ids(mail) for mail in mails]
    found = find_by_message_ids(session, [i for ids in wanted for i in ids])
    return [next((found[i] for i in ids if i in found), None) for ids in wanted]
