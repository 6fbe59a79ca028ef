"""``fleet exporter``: fleet's Prometheus gauges on /metrics."""

from __future__ import annotations

import click

from fleet.cli.root import _settings, console, main


@main.command("exporter")
@click.option("--port", type=int, default=9808, show_default=True)
@click.option("--address", default="0.0.0.0", show_default=True)
def exporter_cmd(port: int, address: str) -> None:
    """Serve fleet's Prometheus gauges (queue lengths, workers, handles, jobs) on /metrics."""
    import time

    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from fleet.metrics import FleetCollector

    REGISTRY.register(FleetCollector(_settings()))
    start_http_server(port, addr=address)
    console.print(f"serving fleet metrics on http://{address}:{port}/metrics", highlight=False)
    while True:
        time.sleep(3600)
