"""``trellis serve``: the REST API over HTTPS with a certificate Trellis issues itself."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated

import typer
import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler

from api.app import create_app
from ca.authority import active_issuer
from ca.config import Context
from ca.jobs import JOBS, Job
from ca.serving import ensure_server_certificate
from cli.common import STATE

log = logging.getLogger("trellis.serve")


def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (TRELLIS_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (TRELLIS_PORT)")] = None,
    no_tls: Annotated[
        bool, typer.Option("--no-tls", help="Plain HTTP: only behind a TLS-terminating proxy")
    ] = False,
) -> None:
    """Serve the REST API."""
    ctx = STATE.context(host=host, port=port)
    settings = ctx.settings
    issuer = active_issuer(ctx)  # refuses to start without a CA, with the init hint
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    scheme = "http" if no_tls else "https"
    tls_options: dict[str, str] = {}
    if not no_tls:
        tls = ensure_server_certificate(ctx)
        tls_options = {"ssl_certfile": str(tls.cert_path), "ssl_keyfile": str(tls.key_path)}
    display_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    typer.echo(f"Trellis serving trust domain {issuer.trust_domain}")
    typer.echo(f"  listening on   {scheme}://{display_host}:{settings.port}")
    typer.echo(f"  trust bundle   {settings.data_dir / 'bundle.pem'}")
    typer.echo(f"  admin token    {settings.admin_token_path}")
    typer.echo(f"  API reference  {scheme}://{display_host}:{settings.port}/docs")
    scheduler = start_scheduler(ctx)
    try:
        uvicorn.run(
            create_app(ctx),
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=False,
            server_header=False,
            **tls_options,  # type: ignore[arg-type]
        )
    finally:
        scheduler.shutdown(wait=False)


def start_scheduler(ctx: Context) -> BackgroundScheduler:
    """Run every maintenance job at start-up (a process that was down catches up) and then on
    its interval; a failure is logged and retried at the next interval."""
    scheduler = BackgroundScheduler(timezone=dt.UTC)
    for job in JOBS:
        scheduler.add_job(
            _run_job,
            "interval",
            seconds=job.every_seconds,
            args=(ctx, job),
            id=job.name,
            next_run_time=dt.datetime.now(dt.UTC),
            max_instances=1,
            coalesce=True,
        )
    scheduler.start()
    return scheduler


def _run_job(ctx: Context, job: Job) -> None:
    try:
        log.info("job %s: %s", job.name, job.run(ctx))
    except Exception:
        log.exception("job %s failed", job.name)
