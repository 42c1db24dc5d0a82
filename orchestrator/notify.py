"""Email alerts through an outbox: the tick writes an ``Alert`` row per event (its unique
``key`` makes the same condition tick after tick, or after a restart, add nothing); a separate
step sends what is unsent with smtplib. A failed send stays in the outbox and is retried with
backoff; it never blocks the tick or loses the alert. When ``digest_after`` or more alerts wait
at once they go out as one digest mail.
"""

from __future__ import annotations

import json
import logging
import re
import smtplib
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from email.message import EmailMessage

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.clusters import Email
from orchestrator.config import smtp_password
from orchestrator.errors import ConfigError, TickBusy
from orchestrator.models import Alert, Job, MetricSample

log = logging.getLogger("orchd.notify")
SMTP_TIMEOUT = 10.0  # seconds
MAX_BACKOFF = 3600.0


def recipients_for(job: Job | None, kind: str, email: Email | None) -> list[str]:
    """Who hears of an alert of ``kind`` about ``job``: the spec's notify.email, else the config's."""
    if email is None:
        return []
    try:
        spec = job.spec if job is not None else None
    except ValueError:  # a stored spec that cannot be read: the config's recipients still hear of it
        spec = None
    on = (spec.notify.on if spec and spec.notify.on is not None else email.on)
    if kind not in on:
        return []
    return list((spec.notify.email if spec and spec.notify.email else None) or email.to)


def job_summary(s: Session, job: Job) -> str:
    """The lines every job mail carries: state, last metrics, cost, how to look closer."""
    last: dict[str, MetricSample] = {}
    for m in s.scalars(select(MetricSample).where(MetricSample.job_id == job.id).order_by(MetricSample.id)):
        last[m.name] = m
    metrics = ", ".join(f"{k}={'nan' if v.value is None else f'{v.value:.6g}'}"
                        + (f" (step {v.step})" if v.step is not None else "") for k, v in last.items()) or "none yet"
    att = job.current_attempt
    errors = (att.rule_state_dict.get("error_lines") if att is not None else None) or []
    error = ("\nThe end of its log:\n" + "\n".join("  " + ln for ln in errors) + "\n") if errors else ""
    return (f"Job {job.id} {job.name} on {job.backend}: {job.state} ({job.reason})\n"
            f"{job.detail}\n{error}\nLast metrics: {metrics}\nCost so far: ${job.cost_usd:.2f}\n"
            f"Attempts: {len(job.attempts)}\n\nLook closer: orchd show {job.id}   |   orchd logs {job.id}\n")


def enqueue(s: Session, key: str, kind: str, subject: str, body: str, recipients: list[str], now: float,
            job: Job | None = None) -> bool:
    """Add an alert unless one with ``key`` exists; returns whether it was added."""
    if not recipients or s.scalar(select(Alert.id).where(Alert.key == key)) is not None:
        return False
    s.add(Alert(key=key, kind=kind, job_id=job.id if job else None, recipients=json.dumps(sorted(recipients)),
                subject=header_safe(subject), body=body, created_at=now, tries=0, next_try_at=now, last_error=""))
    return True


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def header_safe(text: str, limit: int = 300) -> str:
    """``text`` fit for a mail header: control characters (newlines, escapes) become one space,
    so a job name can never add a header or break the message."""
    return _CONTROL.sub(" ", text).strip()[:limit]


def _message(email: Email, to: list[str], subject: str, body: str,
             attachments: list[tuple[str, bytes]] = ()) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = email.sender, ", ".join(to), header_safe(subject)
    msg.set_content(body.replace("\x00", ""))
    for name, png in attachments:
        msg.add_attachment(png, maintype="image", subtype="png", filename=name)
    return msg


def _send(email: Email, password: str | None, msg: EmailMessage) -> None:
    ctx = ssl.create_default_context()
    cls = smtplib.SMTP_SSL if email.security == "ssl" else smtplib.SMTP
    kwargs = {"context": ctx} if email.security == "ssl" else {}
    with cls(email.host, email.port, timeout=SMTP_TIMEOUT, **kwargs) as smtp:
        if email.security == "starttls":
            smtp.starttls(context=ctx)
        if email.user and password is not None:
            smtp.login(email.user, password)
        smtp.send_message(msg)


def flush_outbox(sessions: sessionmaker[Session], email: Email | None, now: float | None = None,
                 lock: Callable[[], AbstractContextManager[None]] | None = None) -> int:
    """Send due unsent alerts; returns how many mails went out. Never raises for SMTP trouble.

    ``lock`` (the database's "outbox" lock, see dblock) makes one process at a time send, so a
    daemon and a cron ``orchd poll`` never mail one alert twice; if another holds it, nothing
    is sent now. Each mail is committed as sent right after the server took it. An alert whose
    message cannot be built is marked failed (``failed_at``, ``last_error``) and never blocks
    the others; a failed send is retried with backoff."""
    if email is None:
        return 0
    try:
        with lock() if lock is not None else nullcontext():
            return _flush(sessions, email, time.time() if now is None else now)
    except TickBusy:
        return 0  # another process is sending


def _flush(sessions: sessionmaker[Session], email: Email, now: float) -> int:
    from orchestrator import digest  # it builds on this module

    with sessions() as s:
        due = list(s.scalars(select(Alert).where(Alert.sent_at.is_(None), Alert.failed_at.is_(None),
                                                 Alert.next_try_at <= now).order_by(Alert.id)))
        if not due:
            return 0
        try:
            password = smtp_password(email.password_env, email.password_file)
        except ConfigError as e:
            log.error("cannot send alerts: %s", e)
            return 0
        for a in due:
            if not a.body and a.job_id is not None and (job := s.get(Job, a.job_id)) is not None:
                a.body = job_summary(s, job)  # as of now: the tick that raised it has committed its figures
        by_to: dict[str, list[Alert]] = defaultdict(list)
        for a in due:
            by_to[a.recipients].append(a)
        sent = 0
        for to_json, alerts in by_to.items():
            to = json.loads(to_json)
            alone = [a for a in alerts if a.plot_jobs is not None]  # a digest goes as itself, plots attached
            alerts = [a for a in alerts if a.plot_jobs is None]
            if len(alerts) >= email.digest_after:
                batches = [(f"[orchd] {len(alerts)} alerts: " + ", ".join(sorted({a.kind for a in alerts})),
                            "\n\n".join(f"== {header_safe(a.subject)}\n{a.body}" for a in alerts), alerts)]
            else:
                batches = [(a.subject, a.body, [a]) for a in alerts]
            batches += [(a.subject, a.body, [a]) for a in alone]
            for subject, body, group in batches:
                try:
                    plots = digest.plots_for(s, group[0]) if group[0].plot_jobs is not None else []
                    msg = _message(email, to, subject, body, plots)
                except Exception as e:  # noqa: BLE001 - a poison message must not hold back the others
                    for a in group:
                        a.failed_at, a.last_error = now, f"cannot build the message: {type(e).__name__}: {e}"[:500]
                    log.error("alert(s) %s cannot be built as a mail (%s); marked failed", [a.id for a in group], e)
                    s.commit()
                    continue
                try:
                    _send(email, password, msg)
                except (OSError, smtplib.SMTPException) as e:
                    for a in group:
                        a.tries += 1
                        a.next_try_at = now + min(MAX_BACKOFF, 30 * 2 ** (a.tries - 1))
                        a.last_error = f"{type(e).__name__}: {e}"[:500]
                    log.warning("SMTP %s:%s failed (%s); %d alert(s) kept for retry", email.host, email.port,
                                type(e).__name__, len(group))
                    s.commit()
                    continue
                for a in group:
                    a.sent_at, a.tries = now, a.tries + 1
                s.commit()  # at once: a crash after this mail must not send it again
                sent += 1
        return sent
