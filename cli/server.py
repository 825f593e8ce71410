"""``trellis serve``: the REST API over HTTPS with a certificate Trellis issues itself."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from typing import Annotated

import typer

from ca.authority import active_issuer, check_keys, load_authority
from ca.config import MAX_WORKERS, Context
from ca.errors import Unavailable
from ca.jobs import catch_up
from ca.logs import configure_logging, debugging
from ca.scheduler import start_scheduler
from ca.serving import ensure_server_certificate
from ca.store.db import SchemaPolicy
from cli.common import STATE, require_set_up

log = logging.getLogger("trellis.serve")
# uvicorn, the supervisor and the API are imported inside ``serve``: every other command would pay
# for them on each start (tests/cli/test_startup.py).


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the banner says where Trellis listens: a port in use
    or an address this host does not have is one line and exit 8 (uvicorn would log a JSON
    line and exit 3, the code of a failed authentication). It is inheritable: ``--workers``
    hands it to the supervisor across ``exec``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise Unavailable(f"cannot listen on {where}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def worker_count(workers: int) -> int:
    """``TRELLIS_WORKERS`` as processes: 0 is one per core, at most ``MAX_WORKERS`` (which
    the setting itself may not exceed) on a host with more cores."""
    return workers if workers > 0 else min(os.cpu_count() or 1, MAX_WORKERS)


def _log_migration(ctx: Context) -> None:
    """Which replica migrated the shared database, and from which revision to which: the one
    line that dates a rolling upgrade's schema change (the others find nothing to do)."""
    migration = ctx.migration
    if migration is None or not migration.changed:
        return
    where = f"node {ctx.settings.node_name}, host {socket.gethostname()}, pid {os.getpid()}"
    if migration.before is None:
        log.info("created the database schema at %s (%s)", migration.after, where)
    else:
        log.info(
            "migrated the database schema from %s to %s (%s)",
            migration.before,
            migration.after,
            where,
        )


def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (TRELLIS_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (TRELLIS_PORT)")] = None,
    no_tls: Annotated[
        bool, typer.Option("--no-tls", help="Plain HTTP: only behind a TLS-terminating proxy")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            help=f"Worker processes (TRELLIS_WORKERS, default 1, at most {MAX_WORKERS};"
            " 0 = one per core)"
        ),
    ] = None,
) -> None:
    """Serve the REST API and run the scheduled jobs (in one of the workers when several)."""
    # Host, port and workers are checked with the other settings, before anything is done.
    given = {"host": host, "port": port, "workers": workers}
    settings = STATE.settings(**given)
    require_set_up(settings)
    # Bound before the context is built: a port in use changes nothing, the schema included.
    listener = listen(settings.host, settings.port)
    ctx = STATE.context(serving=True, schema=SchemaPolicy.MIGRATE, **given)
    configure_logging(debug=debugging())
    _log_migration(ctx)
    load_authority(ctx)  # refuses to start without a CA, with the init hint
    # Every active CA key is there before anything is written: the transitions below rewrite
    # bundle.pem, which a data dir paired with another instance's database (its keys missing)
    # had overwritten with that instance's roots before start-up was refused.
    check_keys(ctx)  # a prepared one that is missing is logged
    catch_up(ctx)  # a process that was down past a transition performs it before serving
    issuer = active_issuer(ctx)
    scheme = "http" if no_tls else "https"
    tls_options: dict[str, str] = {}
    if not no_tls:
        tls = ensure_server_certificate(ctx)
        tls_options = {"ssl_certfile": str(tls.cert_path), "ssl_keyfile": str(tls.key_path)}
    count = worker_count(settings.workers)
    display_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    label = issuer.trust_domain or issuer.authority
    typer.echo(f"Trellis serving {label}")
    typer.echo(f"  listening on   {scheme}://{display_host}:{settings.port} ({count} worker(s))")
    typer.echo(f"  trust bundle   {settings.data_dir / 'bundle.pem'}")
    typer.echo(f"  admin token    {settings.admin_token_path}")
    typer.echo(f"  API reference  {scheme}://{display_host}:{settings.port}/docs")
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,  # keep the JSON/text handlers configure_logging installed
        "access_log": False,
        "server_header": False,
        "http": "cli.http:CorkedHttpToolsProtocol",  # one write per response
        "timeout_graceful_shutdown": 10,
        "max_connections": settings.max_connections,  # cli.http
        "request_timeout": settings.request_timeout,
        **tls_options,
    }
    if count > 1:
        # Workers rebuild the context from the environment: hand them the effective settings,
        # the options too. A variable an option overrode (TRELLIS_WORKERS=two beside --workers
        # 2) was read by every worker, which could not start: the service never served.
        os.environ["TRELLIS_DATA_DIR"] = str(settings.data_dir.resolve())
        os.environ["TRELLIS_DATABASE_URL"] = settings.effective_database_url
        os.environ["TRELLIS_HOST"] = settings.host
        os.environ["TRELLIS_PORT"] = str(settings.port)
        os.environ["TRELLIS_WORKERS"] = str(settings.workers)
        # Event metrics from every worker are summed through files in this directory.
        metrics_dir = settings.data_dir.resolve() / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        ctx.close()
        sys.stdout.flush()
        sys.stderr.flush()
        from cli.supervisor import command as supervisor_command

        argv = supervisor_command({**common, "workers": count}, listener.fileno())
        os.execv(argv[0], argv)  # noqa: S606 (our own interpreter and module)

    from api.app import create_app, freeze_startup_heap  # only a single process needs these
    from cli.single import SingleServer
    from cli.tlsreload import ReloadingConfig

    config = ReloadingConfig(create_app(ctx), **common)  # type: ignore[arg-type]
    scheduler = start_scheduler(ctx)
    freeze_startup_heap()
    try:
        SingleServer(config).run(sockets=[listener])  # SIGHUP, and exit 0 on a stop
    finally:
        scheduler.shutdown(wait=False)
