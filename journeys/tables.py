"""The journey tables, on the workspace database's shared ``metadata``.

    herald_journey_versions     one row per (journey, version): the definition as JSON
    herald_journey_enrollments  one row per (journey, recipient, entry number): the state
    herald_journey_log          one row per step visited, unique on (enrollment, seq)

An enrollment is the shape of Mautic's lead event log and Laudspeaker's journey location:
a durable row with its step, its due time and a lease, claimed in chunks and advanced
idempotently (see README "Journeys").
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from herald.flows.db import metadata

LIVE = ("active", "waiting")
ENDED = ("completed", "exited")

versions = Table(
    "herald_journey_versions", metadata,
    Column("journey", String(128), nullable=False),
    Column("version", String(16), nullable=False),
    Column("definition", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("journey", "version", name="pk_herald_journey_versions"),
)

enrollments = Table(
    "herald_journey_enrollments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("journey", String(128), nullable=False),
    Column("recipient", String(255), nullable=False),
    Column("entry_no", Integer, nullable=False),
    Column("version", String(16), nullable=False),
    Column("step", String(128), nullable=False),
    Column("seq", Integer, nullable=False),  # steps visited so far
    Column("status", String(16), nullable=False),  # active | waiting | completed | exited
    Column("exit_reason", Text),
    Column("tier", String(128), nullable=False),
    Column("cohort", String(64)),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("deadline", DateTime(timezone=True)),  # a wait_for's timeout
    Column("arrived_at", DateTime(timezone=True), nullable=False),  # at the current step
    Column("entered_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("checked_at", DateTime(timezone=True)),  # clock time of the last tick to look
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),  # real time
    Column("data", Text, nullable=False),  # the entry row, JSON
    UniqueConstraint("journey", "recipient", "entry_no", name="uq_herald_journey_entry"),
    Index("ix_herald_journey_due", "journey", "status", "due_at"),
)

log = Table(
    "herald_journey_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("enrollment_id", Integer, nullable=False),
    Column("journey", String(128), nullable=False),
    Column("recipient", String(255), nullable=False),
    Column("entry_no", Integer, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("step", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("outcome", String(64), nullable=False),
    Column("detail", Text),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("tick", String(40), nullable=False),
    UniqueConstraint("enrollment_id", "seq", name="uq_herald_journey_log_visit"),
    Index("ix_herald_journey_log_step", "journey", "step"),
)
