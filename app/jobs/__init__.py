"""Asynchronous jobs: one SQL table (the ledger) that is both the queue and the record of every job."""
