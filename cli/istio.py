"""``trellis istio``: plug Trellis into Istio meshes as their upstream root."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session, select

from ca.durations import Ttl
from ca.istio import (
    IstioParams,
    issue_istio_intermediate,
    mesh_config,
    root_configmap,
    write_output,
)
from ca.keys import KeyType
from ca.pem import fingerprint
from ca.store.models import IstioClusterRow
from cli.common import STATE, emit_json, table, when

istio_app = typer.Typer(help="Istio plug-in CA intermediates and mesh trust.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


@istio_app.command("issue")
def issue(
    cluster: Annotated[str, typer.Option(help="Cluster name (a DNS label)")],
    out: Annotated[Path, typer.Option(help="File (YAML formats) or directory (files format)")],
    key_type: Annotated[str, typer.Option(help="ec-p256, ec-p384, rsa-2048/3072/4096")] = "ec-p256",
    ttl: Annotated[str, typer.Option(help="Intermediate lifetime")] = "30d",
    format: Annotated[
        str, typer.Option("--format", help="secret-yaml, tls-secret-yaml or files")
    ] = "secret-yaml",
    json_out: JsonOpt = False,
) -> None:
    """Issue the intermediate istiod signs with; the scheduler renews it into the same --out."""
    params = IstioParams(
        cluster=cluster,
        key_type=KeyType.parse(key_type),
        ttl=Ttl.parse(ttl),
        output=out,
        output_format=format,
    )
    intermediate = issue_istio_intermediate(STATE.context(), params)
    written = write_output(intermediate, format, out)
    cert = intermediate.certificate
    info = {
        "cluster": cluster,
        "serial": format_serial(cert.serial_number),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": fingerprint(cert),
        "written": [str(path) for path in written],
    }
    if json_out:
        emit_json(info)
        return
    typer.echo(f"issued istio-{cluster} intermediate {info['serial']}, expires {info['not_after']}")
    for path in written:
        typer.echo(f"  wrote {path}")
    typer.echo("  the private key is in that output only: Trellis does not keep it")


def format_serial(value: int) -> str:
    return format(value, "x")


@istio_app.command("list")
def list_clusters(json_out: JsonOpt = False) -> None:
    """Clusters with a Trellis-issued intermediate, and where renewals are written."""
    with Session(STATE.context().engine) as session:
        rows = session.exec(select(IstioClusterRow).order_by(IstioClusterRow.cluster)).all()
    if json_out:
        emit_json(
            [
                {
                    "cluster": r.cluster,
                    "serial": r.serial,
                    "not_after": r.not_after.isoformat(),
                    "key_type": r.key_type,
                    "output": r.output,
                    "format": r.output_format,
                }
                for r in rows
            ]
        )
        return
    table(
        ["CLUSTER", "SERIAL", "NOT AFTER", "KEY", "OUTPUT"],
        [[r.cluster, r.serial[:16], when(r.not_after), r.key_type, r.output or "-"] for r in rows],
    )


@istio_app.command("root-configmap")
def root_configmap_cmd(
    namespace: Annotated[str, typer.Option(help="Namespace of the ConfigMap")] = "istio-system",
) -> None:
    """The istio-ca-root-cert ConfigMap (every current trust anchor)."""
    typer.echo(root_configmap(STATE.context(), namespace).rstrip())


@istio_app.command("mesh-config")
def mesh_config_cmd() -> None:
    """The meshConfig snippet: trustDomain and caCertificates (spiffeBundleUrl or PEM)."""
    typer.echo(mesh_config(STATE.context()).rstrip())
