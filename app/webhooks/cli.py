"""``gateway jobs webhooks ...``: see the configured webhook endpoints, and re-enable one that a 410 disabled."""

from __future__ import annotations

import json

import click
from flask import Flask

from app.audit import audit
from app.jobs import ledger
from app.webhooks.delivery import dead_deliveries
from app.webhooks.endpoints import enable, endpoints, with_url


def init_webhooks_cli(app: Flask, jobs_group: click.Group) -> None:
    @jobs_group.group("webhooks")
    def webhooks_group():
        """Webhook endpoints (configured in CDS_CLIENTS_FILE): their state, and re-enabling them."""

    @webhooks_group.command("list")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    def list_command(as_json: bool) -> None:
        """Every configured endpoint: id, client, URL, events, and whether (and why) it is disabled."""
        listed = endpoints(app)
        for endpoint in listed:
            if as_json:
                click.echo(json.dumps(endpoint))
                continue
            state = (
                f"disabled since {endpoint['disabled_at']} ({endpoint['disabled_reason']})"
                if endpoint["disabled_at"]
                else "enabled"
            )
            click.echo(
                f"{endpoint['id']}\t{endpoint['client_iss']}\t{endpoint['url']}\t{','.join(endpoint['events'])}\t{state}"
            )
        if not as_json:
            disabled = sum(1 for endpoint in listed if endpoint["disabled_at"])
            click.echo(f"{len(listed)} endpoint(s), {disabled} disabled", err=True)

    @webhooks_group.command("enable")
    @click.argument("url")
    @click.option("--client", "client_iss", default=None, help="Only the endpoint of this client issuer.")
    @click.option("--requeue", is_flag=True, help="Also send its dead-lettered deliveries again.")
    def enable_command(url: str, client_iss: str | None, requeue: bool) -> None:
        """Deliver to URL again after it answered 410 Gone (every client's endpoint with that URL, or --client's)."""
        engine = app.extensions["db"]
        found = with_url(app, url, client_iss)
        if not found:
            raise click.ClickException(
                f"no webhook endpoint has the URL {url!r}"
                + (f" for client {client_iss!r}" if client_iss else "")
                + ": `gateway jobs webhooks list` shows them"
            )
        for endpoint_id, iss in found:
            if enable(engine, endpoint_id):
                audit(app).record("webhook.enabled", endpoint=endpoint_id, iss=iss, via="cli")
                click.echo(f"endpoint {endpoint_id} ({iss}) enabled")
            else:
                click.echo(f"endpoint {endpoint_id} ({iss}) was not disabled")
            if requeue:
                requeued = sum(ledger.requeue(engine, job_id) for job_id in dead_deliveries(engine, endpoint_id))
                click.echo(f"endpoint {endpoint_id}: {requeued} dead deliveries requeued")
