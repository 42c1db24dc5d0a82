"""Alerts through an outbox: the tick writes an ``Alert`` row per event and channel (its unique
``key`` makes the same condition tick after tick, or after a restart, add nothing); a separate
step sends what is unsent: mail with smtplib, the config's ``notify.urls`` with apprise (Slack,
ntfy, webhooks, ...). A failed send stays in the outbox and is retried with backoff; it never
blocks the tick or loses the alert. When ``digest_after`` or more alerts wait at once for one
destination they go out as one message. A job alert's body is written when it is sent, from
committed rows, so it carries the figures of that moment, not those before the tick's own.

Delivery is at least once, as one message: each message's Message-ID is committed before it is
sent and ``sent_at`` as soon as the server has taken it. A process killed between the two (the
server's reply in flight) cannot know whether it arrived, so the next sender sends the same
message again, same Message-ID, subject and body, which a mail client can tell for a repeat. Losing a
"job failed" mail would be worse than a repeat. A notification URL has no such id: a repeat
there, in that same window, is a second post.

A URL is never stored: an alert names it as ``url:<first 16 hex of its sha256>``, resolved
against the config when sent (a URL taken out of the config since marks its alerts failed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import smtplib
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from email.message import EmailMessage
from email.utils import make_msgid

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.clusters import Channels, Email
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


def url_target(url: str) -> str:
    """The name an alert gives a notification URL: ``url:`` + 16 hex of its sha256 (the URL, with
    its tokens, stays in the config)."""
    return "url:" + hashlib.sha256(url.encode()).hexdigest()[:16]


def raise_alert(s: Session, key: str, kind: str, subject: str, body: str, email: Email | None,
                channels: Channels | None, now: float, job: Job | None = None) -> int:
    """Enqueue an alert of ``kind`` for everyone who hears of it: the mail recipients
    (``recipients_for``) under ``key``, and each of the config's notification URLs whose ``on``
    has the kind under ``key|url:<hash>``. Returns the rows added."""
    added = int(enqueue(s, key, kind, subject, body, recipients_for(job, kind, email), now, job))
    if channels is not None and kind in channels.on:
        for url in channels.urls:
            target = url_target(url)
            added += enqueue(s, f"{key}|{target}", kind, subject, body, [target], now, job)
    return added


def enqueue(s: Session, key: str, kind: str, subject: str, body: str, recipients: list[str], now: float,
            job: Job | None = None, plot_jobs: list[int] | None = None) -> bool:
    """Add an alert unless one with ``key`` exists; returns whether it was added. ``plot_jobs``:
    the jobs whose plots the mail carries (drawn when it is sent; see digest.plots_for)."""
    if not recipients or s.scalar(select(Alert.id).where(Alert.key == key)) is not None:
        return False
    s.add(Alert(key=key, kind=kind, job_id=job.id if job else None, recipients=json.dumps(sorted(recipients)),
                subject=header_safe(subject), body=body, created_at=now, tries=0, next_try_at=now, last_error="",
                plot_jobs=json.dumps(plot_jobs) if plot_jobs is not None else None))
    return True


def _to_url(a: Alert) -> bool:
    """Whether the alert goes to a notification URL (its recipient is ``url:<hash>``), not by mail."""
    return a.recipients.startswith('["url:')


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


def _send(email: Email, password: str | None, msg: EmailMessage, accepted: Callable[[], None]) -> None:
    """Send ``msg``; ``accepted()`` runs as soon as the server has taken it, before the QUIT
    exchange, so the window in which a crash resends it is one round trip shorter."""
    ctx = ssl.create_default_context()
    cls = smtplib.SMTP_SSL if email.security == "ssl" else smtplib.SMTP
    kwargs = {"context": ctx} if email.security == "ssl" else {}
    with cls(email.host, email.port, timeout=SMTP_TIMEOUT, **kwargs) as smtp:
        if email.security == "starttls":
            smtp.starttls(context=ctx)
        if email.user and password is not None:
            smtp.login(email.user, password)
        smtp.send_message(msg)
        accepted()


def _expand(url: str) -> str:
    """``${VAR}`` in a URL from the environment (raises ConfigError naming the variable)."""
    def value(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            raise ConfigError(f"notify.urls: ${{{m.group(1)}}} is not set")
        return os.environ[m.group(1)]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value, url)


def _send_url(url: str, subject: str, body: str) -> None:
    """Send through apprise; raises OSError when apprise reports a failure (it logs why),
    ValueError for a URL it does not understand, ConfigError without apprise or a ${VAR}."""
    try:
        import apprise
    except ImportError:
        raise ConfigError("notify.urls needs apprise: pip install 'orchd[notify]'") from None
    quiet = logging.getLogger("apprise")  # its DEBUG lines print a URL's headers, tokens and all
    quiet.setLevel(max(quiet.getEffectiveLevel(), logging.INFO))

    ap = apprise.Apprise()
    if not ap.add(_expand(url)):
        raise ValueError("apprise does not understand this URL")
    if not ap.notify(title=subject, body=body):
        raise OSError("apprise could not deliver it (see its log line above)")


def _domain(email: Email | None) -> str:
    """The right-hand side of our Message-IDs: the sender's mail domain (RFC 5322 3.6.4 asks for
    a unique id; ``make_msgid``'s default, the host's FQDN, can mean a slow DNS lookup)."""
    domain = re.sub(r"[^A-Za-z0-9.-]", "", (email.sender if email is not None else "").rpartition("@")[2])
    return domain[-100:].lstrip(".-") or "orchd.invalid"  # (the column holds 250 characters)


def _batches(alerts: list[Alert], digest_after: int) -> list[tuple[str, str, list[Alert]]]:
    """The messages that carry ``alerts`` (one destination's): ``(subject, body, alerts)`` each.
    Alerts claimed by an earlier message (their ``message_id``) go as that message again, the
    same subject and body; the rest go one message each, or as one digest when ``digest_after``
    or more wait. An alert with plots (a scheduled digest) always goes as itself."""
    claimed: dict[str, list[Alert]] = defaultdict(list)
    for a in alerts:
        if a.message_id is not None:
            claimed[a.message_id].append(a)
    fresh = [a for a in alerts if a.message_id is None]
    alone = [[a] for a in fresh if a.plot_jobs is not None]
    fresh = [a for a in fresh if a.plot_jobs is None]
    groups = [*claimed.values()]
    groups += [fresh] if len(fresh) >= digest_after else [[a] for a in fresh]
    batches = []
    for group in groups + alone:
        if len(group) > 1 or (group[0].plot_jobs is None and digest_after <= 1):
            batches.append((f"[orchd] {len(group)} alerts: " + ", ".join(sorted({a.kind for a in group})),
                            "\n\n".join(f"== {header_safe(a.subject)}\n{a.body}" for a in group), group))
        else:
            batches.append((group[0].subject, group[0].body, group))
    return batches


def flush_outbox(sessions: sessionmaker[Session], email: Email | None, now: float | None = None,
                 lock: Callable[[], AbstractContextManager[None]] | None = None,
                 channels: Channels | None = None) -> int:
    """Send due unsent alerts; returns how many messages went out. Never raises for SMTP or
    notification trouble.

    ``lock`` (the database's "outbox" lock, see dblock) makes one process at a time send, so a
    daemon and a cron ``orchd poll`` never mail one alert twice; if another holds it, nothing
    is sent now. Each mail is committed as sent right after the server took it (see the module's
    note on delivery). An alert whose message cannot be built is marked failed (``failed_at``,
    ``last_error``) and never blocks the others; a failed send is retried with backoff."""
    if email is None and (channels is None or not channels.urls):
        return 0
    try:
        with lock() if lock is not None else nullcontext():
            return _flush(sessions, email, time.time() if now is None else now, channels)
    except TickBusy:
        return 0  # another process is sending


def _flush(sessions: sessionmaker[Session], email: Email | None, now: float, channels: Channels | None = None
           ) -> int:
    from orchestrator import digest  # it builds on this module

    urls = {url_target(u): u for u in (channels.urls if channels else [])}
    with sessions() as s:
        due = list(s.scalars(select(Alert).where(Alert.sent_at.is_(None), Alert.failed_at.is_(None),
                                                 Alert.next_try_at <= now).order_by(Alert.id)))
        if not due:
            return 0
        password = None
        if email is not None and not all(_to_url(a) for a in due):
            try:
                password = smtp_password(email.password_env, email.password_file)
            except ConfigError as e:
                log.error("cannot send alert mails: %s", e)
                due = [a for a in due if _to_url(a)]
        for a in due:
            if not a.body and a.job_id is not None and (job := s.get(Job, a.job_id)) is not None:
                a.body = job_summary(s, job)  # as of now: the tick that raised it has committed its figures
        by_to: dict[str, list[Alert]] = defaultdict(list)
        for a in due:
            by_to[a.recipients].append(a)
        sent = 0
        digest_after = email.digest_after if email is not None else 3
        for to_json, alerts in by_to.items():
            to = json.loads(to_json)
            url = urls.get(to[0]) if _to_url(alerts[0]) else None
            if _to_url(alerts[0]) and url is None:  # taken out of the config since: nowhere to send it
                for a in alerts:
                    a.failed_at, a.last_error = now, "its notification URL is no longer in the config"
                s.commit()
                continue
            if url is None and email is None:
                continue  # mail alerts wait for an email config
            for subject, body, group in _batches(alerts, digest_after):
                try:
                    if url is None:
                        plots = digest.plots_for(s, group[0]) if group[0].plot_jobs is not None else []
                        msg = _message(email, to, subject, body, plots)
                except Exception as e:  # noqa: BLE001 - a poison message must not hold back the others
                    for a in group:
                        a.failed_at, a.last_error = now, f"cannot build the message: {type(e).__name__}: {e}"[:500]
                    log.error("alert(s) %s cannot be built as a mail (%s); marked failed", [a.id for a in group], e)
                    s.commit()
                    continue
                if group[0].message_id is None:  # claimed before it goes: a crash's retry sends this same message
                    message_id = make_msgid("orchd.alert" + ".".join(str(a.id) for a in group)[:60],
                                            domain=_domain(email))
                    for a in group:
                        a.message_id = message_id
                    s.commit()

                def accepted(group: list[Alert] = group) -> None:
                    for a in group:
                        a.sent_at, a.tries = now, a.tries + 1
                    s.commit()  # at once: a crash after this must not send the message again

                try:
                    if url is None:
                        msg["Message-ID"] = group[0].message_id
                        _send(email, password, msg, accepted)
                    else:
                        _send_url(url, header_safe(subject), body)
                        accepted()
                except ValueError as e:  # apprise does not know the URL's scheme: retrying will not help
                    for a in group:
                        a.failed_at, a.last_error = now, f"{to[0]}: {e}"
                    log.error("alert(s) %s to %s: %s; marked failed", [a.id for a in group], to[0], e)
                    s.commit()
                    continue
                except (OSError, smtplib.SMTPException, ConfigError) as e:
                    if group[0].sent_at is not None:  # the server took it; only its goodbye failed
                        sent += 1
                        continue
                    for a in group:
                        a.tries += 1
                        a.next_try_at = now + min(MAX_BACKOFF, 30 * 2 ** (a.tries - 1))
                        a.last_error = f"{type(e).__name__}: {e}"[:500]
                    where = to[0] if url is not None else f"SMTP {email.host}:{email.port}"
                    log.warning("%s failed (%s: %s); %d alert(s) kept for retry", where, type(e).__name__, e,
                                len(group))
                    s.commit()
                    continue
                sent += 1
        return sent
