"""Example batch type ``mail/send`` (ported from Alya's mail example): a mailing whose output files cover
only some rows.

Each row is ``{"to": "someone@example.com", "subject": "...", "optout": false}``. Nothing is really sent:
the init block is a stand-in outbox. A valid address is "sent" and adds a line to ``sent.csv``; an
invalid one fails with ``ErrorMessage(errcode="invalid_address", field="to")`` and adds a line to
``bounced.csv``; a recipient who opted out succeeds without adding anything to any file.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from alya import BatchJobResult, BatchStatus, ErrorMessage, JobManager, batch_flow
from flows.bank import _csv_line
from flows.common import LoggingDone, example_jobmanager, first_registration

APP, OP = "mail", "send"
ADDRESS = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$")


class Outbox:
    """The init block: stands for an SMTP connection; counts what it "sent"."""

    def __init__(self) -> None:
        self.sent = 0
        self._lock = threading.Lock()
        self._open = True

    def send(self, to: str, subject: str) -> str:
        with self._lock:
            self.sent += 1
            return f"<{self.sent}.{id(self)}@alya.example>"

    def is_alive(self) -> bool:
        return self._open

    def close(self) -> None:
        self._open = False


class MailInitializer:
    def init(self, app: str) -> Outbox:
        return Outbox()


class MailSendProcessor(LoggingDone):
    def do_batch_job(self, initblock: Outbox, context: dict[str, Any], line: int,
                     input: dict[str, Any]) -> BatchJobResult:
        to = input.get("to")
        subject = str(input.get("subject", ""))
        if input.get("optout"):
            return BatchJobResult(status=BatchStatus.SUCCESS, result={"skipped": "optout"})
        if not isinstance(to, str) or not ADDRESS.match(to):
            return BatchJobResult(
                status=BatchStatus.FAILED,
                messages=[ErrorMessage(msgid=10, errcode="invalid_address", field="to", vals=[str(to)])],
                blobrows={"bounced.csv": _csv_line(line, to)},
            )
        msgid = initblock.send(to, subject)
        return BatchJobResult(status=BatchStatus.SUCCESS, result={"messageid": msgid},
                              blobrows={"sent.csv": _csv_line(line, to, subject)})


def register(jm: JobManager) -> None:
    if not first_registration(jm, APP):
        return
    jm.register_initializer(APP, MailInitializer())
    jm.register_batch_processor(APP, OP, MailSendProcessor())


def make_mailing(n: int) -> list[dict[str, Any]]:
    """``n`` rows: every 5th address invalid, every 7th (otherwise valid) recipient opted out."""
    rows = []
    for i in range(1, n + 1):
        to = f"user{i}@example" if i % 5 == 0 else f"user{i}@example.com"
        rows.append({"to": to, "subject": f"Statement {i}", "optout": i % 7 == 0 and i % 5 != 0})
    return rows


jm = example_jobmanager()
register(jm)


@batch_flow(APP, OP)
def mail_send_flow(batch_id: str | None = None) -> dict[str, Any]:
    """Example batch type mail/send: a mailing whose output files cover some rows.

    A deployment's run works on batch ``batch_id``; without one, on every queued batch of the type."""
    return jm.process_batches(APP, OP, batch_id)
