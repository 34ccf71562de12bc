"""The gateway with a per-process jti replay cache, as before the host state file: a baseline only.

Used by ``bench.hook_throughput --replay memory`` to measure what sharing the replay cache between workers costs
on the hook path. Never a way to run the service: a per-process cache lets a token be replayed on another worker.
"""

from app import create_app
from app.cds.replay import MemoryReplayCache


def per_process_app():
    app = create_app()
    app.extensions["cds"].authenticator._replay = MemoryReplayCache()
    return app
