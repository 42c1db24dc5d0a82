"""The daily digest: once a day, at the config's ``email.digest_time`` (local time), everyone
with ``digest`` in their ``notify.on`` (a spec's, else the config's ``email.on``) gets the
report of every job that changed since the previous digest (at most a day back), with each
job's plot attached.

It goes through the outbox like every alert: the tick enqueues it under the key
``digest:<date>:<recipients>`` (so a second process, a restart or the next tick adds nothing);
the outbox sends it, drawing the plots then (``plots_for``) rather than storing PNGs in the
database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator import notify
from orchestrator.clusters import Email
from orchestrator.models import Alert, Job

WINDOW_MAX = 24 * 3600.0  # seconds: the first digest (or one after a pause) covers at most a day


def due_at(email: Email, now: float) -> float:
    """Epoch seconds of today's digest time (local time) as of ``now``."""
    hh, mm = map(int, email.digest_time.split(":"))
    today = dt.datetime.fromtimestamp(now).replace(hour=hh, minute=mm, second=0, microsecond=0)
    return today.timestamp()


def enqueue_due(s: Session, email: Email | None, now: float) -> int | None:
    """Enqueue today's digests if their time has come and they are not enqueued yet; returns how
    many were added, or None when there is nothing more to do today (done, or nobody asks for
    one): the caller may skip asking again until the date changes. Before the digest time: 0,
    no query."""
    from orchestrator.report import markdown
    from orchestrator.service import changed_job_ids, reports_in

    if email is None or now < due_at(email, now):
        return 0
    date = dt.date.fromtimestamp(now).isoformat()
    if s.scalar(select(Alert.id).where(Alert.key.like(f"digest:{date}:%")).limit(1)) is not None:
        return None  # today's is enqueued (every recipient list's digest is added in one commit)
    if "digest" not in email.on and s.scalar(select(Job.id).where(Job.spec_json.like('%"digest"%')).limit(1)) is None:
        return None  # nobody asks for one (a spec's notify.on may, on its own)
    last = s.scalar(select(func.max(Alert.created_at)).where(Alert.kind == "digest"))
    since = max(last or 0.0, now - WINDOW_MAX)
    by_recipients: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for job in (s.get(Job, i) for i in changed_job_ids(s, since)):
        if job is not None and (to := notify.recipients_for(job, "digest", email)):
            by_recipients[tuple(sorted(to))].append(job.id)
    added = 0
    window = f"{dt.datetime.fromtimestamp(since):%Y-%m-%d %H:%M} to {dt.datetime.fromtimestamp(now):%Y-%m-%d %H:%M}"
    for to, ids in by_recipients.items():
        reps = reports_in(s, ids)
        title = f"orchd digest: {len(ids)} job(s) changed, {window}"
        images = {r.id: f"job{r.id}.png" for r in reps if r.has_plot}  # the attachments, as plots_for names them
        key = f"digest:{date}:{hashlib.sha256(json.dumps(to).encode()).hexdigest()[:16]}"
        subject = f"[orchd] digest: {len(ids)} job(s) changed"
        added += notify.enqueue(s, key, "digest", subject, markdown(reps, title, images), list(to), now,
                                plot_jobs=ids)
    if not by_recipients:  # nothing changed: remember the day was done, so the next window starts here
        s.add(Alert(key=f"digest:{date}:none", kind="digest", recipients="[]", subject="", body="", created_at=now,
                    sent_at=now, tries=0, next_try_at=now, last_error=""))
    return added


def plots_for(s: Session, alert: Alert) -> list[tuple[str, bytes]]:
    """(file name, PNG) of each job the alert names in ``plot_jobs`` that has something to plot;
    a job deleted since is left out."""
    from orchestrator.errors import JobNotFound
    from orchestrator.service import reports_in

    out = []
    for job_id in json.loads(alert.plot_jobs or "[]"):
        try:
            (rep,) = reports_in(s, [job_id])
        except JobNotFound:
            continue
        if (png := rep.plot()) is not None:
            out.append((f"job{job_id}.png", png))
    return out
