"""What workers do between jobs, on a timer: end lapsed leases, fold the job counts, purge after retention.

Every step is bounded (a batch per statement) and safe to run from any number of workers at once, so each
worker runs it and no single process is needed for the ledger to stay small and its counts current.
What is purged and when is declared once, in ``app.retention.TABLE``.
"""

from __future__ import annotations

import logging
from datetime import datetime

from flask import Flask

from app import retention
from app.clock import Clock, app_clock, wall_time
from app.jobs import ledger
from app.logs import describe

log = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0  # expired and worker-killing jobs leave the queue, and counts are current, within this time
PURGE_SECONDS = 60.0
FOLD_ROUNDS = 5  # batches of pending count changes folded per sweep, at most


class Maintenance:
    """The housekeeping one worker does: ``run_due()`` between jobs does what is due and returns at once.
    Rounds and the times swept and purged against are read from ``clock`` (the application's by default)."""

    def __init__(self, app: Flask, *, clock: Clock | None = None):
        self.engine = app.extensions["db"]
        self.config = app.config
        self.clock = clock or app_clock(app)
        self._next_sweep = float("-inf")
        self._next_purge = float("-inf")

    def run_due(self) -> None:
        now = self.clock.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
            self._step("sweep", self.sweep)
        if now >= self._next_purge:
            self._next_purge = now + PURGE_SECONDS
            self._step("purge", self.purge)

    def sweep(self) -> None:
        ledger.sweep(self.engine, self._now())
        for _ in range(FOLD_ROUNDS):
            if ledger.fold_counts(self.engine) < ledger.FOLD_BATCH:
                break

    def purge(self) -> int:
        """Everything past its retention (``app.retention.TABLE``), in batches, within a few seconds (a drain of
        hundreds of jobs a second leaves tens of thousands a minute to delete); returns how many rows went."""
        return retention.purge_all(self.engine, self.config, now=self._now())

    def _now(self) -> datetime:
        return wall_time(self.clock)

    def _step(self, name: str, step) -> None:
        try:
            step()
        except Exception as exc:  # the database went away: the next round tries again
            log.error("ledger %s failed: %s", name, describe(exc))
