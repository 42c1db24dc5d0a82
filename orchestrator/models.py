"""The job database (SQLAlchemy 2 ORM). Schema changes go through alembic (``migrations/``).

A job's whole history is rows: one ``Attempt`` per try, one ``Event`` per state change, one
``MetricSample`` per logged value, one ``KeysReport`` per checkpoint-loading report, one
``Action`` per decision the rules took (with its reason). Times are UTC epoch seconds (float).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from orchestrator.spec import JobSpec, Override
from orchestrator.states import JobState


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One job (one sweep combination). ``state`` is changed only by ``lifecycle.switch_state``."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    sweep_id: Mapped[str | None] = mapped_column(String(64), index=True)
    project: Mapped[str | None] = mapped_column(String(100))
    backend: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(Text, default="")
    spec_json: Mapped[str] = mapped_column(Text)
    spec_path: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    not_before: Mapped[float | None] = mapped_column(Float)  # earliest start of the next attempt
    success_met_at: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    # a cancel is recorded before the backend is asked, so whoever ticks next finishes it and no
    # retry rule ever treats its end as a failure
    cancel_requested_at: Mapped[float | None] = mapped_column(Float)
    cancel_reason: Mapped[str] = mapped_column(Text, default="")
    error_count: Mapped[int] = mapped_column(Integer, default=0)  # ticks in a row that failed on this job

    attempts: Mapped[list[Attempt]] = relationship(back_populates="job", order_by="Attempt.number")

    @property
    def job_state(self) -> JobState:
        return JobState(self.state)

    @property
    def spec(self) -> JobSpec:
        return JobSpec.from_stored(self.spec_json)

    @property
    def current_attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None


class Attempt(Base):
    """One try of a job on its backend. ``log_offset`` (bytes) is how far the log was parsed;
    ``parser_state`` the small JSON context the parser carries between ticks."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20))
    backend_id: Mapped[str | None] = mapped_column(String(300))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    overrides_json: Mapped[str] = mapped_column(Text, default="{}")
    submitted_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    log_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    parser_state: Mapped[str] = mapped_column(Text, default="{}")
    last_log_at: Mapped[float | None] = mapped_column(Float)  # when the log last grew
    rule_state: Mapped[str] = mapped_column(Text, default="{}")  # best values, checks passed (rules.JobView)
    started_at: Mapped[float | None] = mapped_column(Float)  # when it began running (billing starts)
    usd_per_hour: Mapped[float | None] = mapped_column(Float)  # price recorded at launch, USD/hr
    gpus: Mapped[int] = mapped_column(Integer, default=0)  # GPUs allocated (nodes x gpus_per_node)
    gpu_hours: Mapped[float] = mapped_column(Float, default=0.0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    # set and committed before the backend is asked to start it: a tick that finds it set without
    # a backend id asks the backend whether the start happened (Backend.find) before starting again
    submitting_at: Mapped[float | None] = mapped_column(Float)
    # while a rented instance is being launched: until when (epoch s) the orchd process launching
    # it vouches for the launch (renewed every LEASE_SECONDS / 4 by that process: orchestrator/leases.py),
    # so no other orchd home takes it for an abandoned one
    launch_lease_until: Mapped[float | None] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="attempts")

    @property
    def parser_state_dict(self) -> dict[str, Any]:
        return json.loads(self.parser_state or "{}")

    @property
    def rule_state_dict(self) -> dict[str, Any]:
        return json.loads(self.rule_state or "{}")

    @property
    def override(self) -> Override | None:
        if not self.overrides_json or self.overrides_json == "{}":  # most attempts; asked thrice a tick
            return None
        data = json.loads(self.overrides_json)
        return Override.model_validate(data) if data else None


class Event(Base):
    """A state change of a job (or of one of its attempts)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str | None] = mapped_column(String(20))
    to_state: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(Text, default="")


class MetricSample(Base):
    """A logged metric value. NaN is stored as NULL (SQLite has no NaN); ``offset`` is the byte
    position of its line in the attempt's log."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_job_name_step", "job_id", "name", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    step: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    value: Mapped[float | None] = mapped_column(Float)
    offset: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[float] = mapped_column(Float)


class KeysReport(Base):
    """Checkpoint-loading report: ``kind`` "missing" | "unexpected", ``keys`` a JSON list."""

    __tablename__ = "keys_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))
    count: Mapped[int] = mapped_column(Integer)
    keys_json: Mapped[str] = mapped_column(Text)
    offset: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[float] = mapped_column(Float)


class Alert(Base):
    """An alert to mail: written once per event (``key`` is unique, so the same condition on the
    next tick or after a restart adds nothing), sent later by the outbox (``sent_at``)."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    recipients: Mapped[str] = mapped_column(Text)  # JSON list
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, index=True)
    tries: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    failed_at: Mapped[float | None] = mapped_column(Float)  # given up: the message cannot be built or sent
    plot_jobs: Mapped[str | None] = mapped_column(Text)  # JSON list of job ids whose plots go with it (digest)
    # the Message-ID of the message carrying it, committed before the send: a process killed after
    # the server took the message and before ``sent_at`` was committed sends that same message again
    message_id: Mapped[str | None] = mapped_column(String(250))


class Action(Base):
    """A decision taken for a job (submit, cancel, retry, success, ...) and why."""

    __tablename__ = "actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text)


class Heartbeat(Base):
    """When something last ran (``name`` "watcher": the last tick of ``orchd daemon`` or ``orchd
    poll``, by any process), so ``orchd status`` can say that nothing watches the jobs."""

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    at: Mapped[float] = mapped_column(Float)
