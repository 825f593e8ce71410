"""``trellis serve``: the REST API over HTTPS with a certificate Trellis issues itself."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from api.app import create_app
from ca.authority import active_issuer
from ca.scheduler import start_scheduler
from ca.serving import ensure_server_certificate
from cli.common import STATE


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
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
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
    config = uvicorn.Config(
        create_app(ctx),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        server_header=False,
        **tls_options,  # type: ignore[arg-type]
    )
    config.load()
    scheduler = start_scheduler(ctx)
    if config.ssl is not None:
        # uvicorn reads its certificate once; reload it into the live SSL context whenever the
        # server-certificate job renews it (short-lived CAs rotate under a running server).
        watch = _CertificateWatch(config.ssl, tls_options)
        scheduler.add_job(watch.check, "interval", seconds=5, id="tls-reload")
    try:
        uvicorn.Server(config).run()
    finally:
        scheduler.shutdown(wait=False)


class _CertificateWatch:
    def __init__(self, context: ssl.SSLContext, files: dict[str, str]) -> None:
        self.context, self.cert, self.key = context, files["ssl_certfile"], files["ssl_keyfile"]
        self.mtime = Path(self.cert).stat().st_mtime

    def check(self) -> None:
        mtime = Path(self.cert).stat().st_mtime
        if mtime != self.mtime:
            self.context.load_cert_chain(self.cert, self.key)
            self.mtime = mtime
            logging.getLogger("trellis.serve").info("reloaded the serving certificate")
