"""``trellis istio``: plug Trellis into Istio meshes as their upstream root."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session, select

from ca.durations import Ttl
from ca.errors import InvalidInput
from ca.files import check_writable
from ca.istio import (
    IstioParams,
    deliver,
    issue_istio_intermediate,
    mesh_config,
    root_configmap,
)
from ca.istio_clusters import remove_cluster
from ca.keys import KeyType
from ca.pem import fingerprint
from ca.store.models import IstioClusterRow
from cli.common import STATE, confirm, emit_json, iso, table, warn_crl_skipped, when

istio_app = typer.Typer(help="Istio plug-in CA intermediates and mesh trust.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


@istio_app.command("issue")
def issue(
    cluster: Annotated[str, typer.Option(help="Cluster name (a DNS label)")],
    out: Annotated[
        Path | None, typer.Option(help="File (YAML formats) or directory (files format)")
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="Apply the Secret with kubectl using this kubeconfig (not with --out)"),
    ] = None,
    kube_context: Annotated[
        str | None, typer.Option(help="Context in --kubeconfig (default: its current-context)")
    ] = None,
    key_type: Annotated[str, typer.Option(help="ec-p256, ec-p384, rsa-2048/3072/4096")] = "ec-p256",
    ttl: Annotated[str, typer.Option(help="Intermediate lifetime")] = "30d",
    format: Annotated[
        str, typer.Option("--format", help="secret-yaml, tls-secret-yaml or files")
    ] = "secret-yaml",
    with_crl: Annotated[
        bool, typer.Option("--with-crl", help="Add ca-crl.pem (a CRL for each CA of the chain)")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Issue the intermediate istiod signs with, into --out or with kubectl (--kubeconfig).

    An output is either a path or a kubeconfig target, never both: the CA key should exist in
    one place outside istiod, and applying it straight into the cluster keeps it off local disk.
    The scheduler renews it into the same output.
    """
    if out is None and kubeconfig is None:
        raise InvalidInput("give --out PATH or --kubeconfig PATH")
    params = IstioParams(
        cluster=cluster,
        key_type=KeyType.parse(key_type),
        ttl=Ttl.parse(ttl),
        output=out,
        output_format=format,
        kubeconfig=kubeconfig,
        kube_context=kube_context,
        with_crl=with_crl,
    )
    if out is not None:  # before anything is issued; what kind of path depends on --format
        own = STATE.own_data()
        check_writable(out, directory=format == "files", what=f"--out {out}", own=own)
    intermediate = issue_istio_intermediate(STATE.context(), params)
    delivered = deliver(STATE.context(), intermediate, params)
    cert = intermediate.certificate
    info = {
        "cluster": cluster,
        "serial": format_serial(cert.serial_number),
        "not_after": iso(cert.not_valid_after_utc),
        "sha256": fingerprint(cert),
        "written": [] if kubeconfig else delivered,
        "applied": delivered[0] if kubeconfig else None,
    }
    if json_out:
        emit_json(info)
        return
    typer.echo(f"issued istio-{cluster} intermediate {info['serial']}, expires {info['not_after']}")
    for line in delivered:
        typer.echo(f"  {'applied' if kubeconfig else 'wrote'} {line}")
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
                    "not_after": iso(r.not_after),
                    "key_type": r.key_type,
                    "output": r.output,
                    "format": r.output_format,
                    "kubeconfig": r.kubeconfig,
                    "kube_context": r.kube_context,
                    "with_crl": r.with_crl,
                    "last_error": r.last_error,
                }
                for r in rows
            ]
        )
        return
    table(
        ["CLUSTER", "SERIAL", "NOT AFTER", "KEY", "OUTPUT"],
        [[r.cluster, r.serial[:16], when(r.not_after), r.key_type, _output(r)] for r in rows],
    )
    for r in rows:
        if r.last_error:
            typer.echo(f"{r.cluster}: delivery failed, the scheduler retries: {r.last_error}")


def _output(row: IstioClusterRow) -> str:
    if row.kubeconfig:
        return f"kubectl:{row.kubeconfig}" + (f"#{row.kube_context}" if row.kube_context else "")
    return row.output or "-"


@istio_app.command("remove")
def remove(
    cluster: Annotated[str, typer.Option(help="Cluster name, as in 'trellis istio list'")],
    revoke: Annotated[
        bool,
        typer.Option(
            "--revoke",
            help="Also revoke its unexpired intermediates (istiod's workloads stop verifying)",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Stop renewing a cluster's intermediate; its output is left as it is.

    istiod keeps signing with the current intermediate until it expires. --revoke also puts
    every unexpired intermediate of the cluster on the root's CRL (cessationOfOperation).
    """
    if not yes:
        also = " and revoke its intermediates" if revoke else ""
        confirm(f"Stop renewing Istio cluster {cluster}{also}?")
    removed = remove_cluster(STATE.context(), cluster, revoke=revoke)
    if json_out:
        emit_json(
            {
                "cluster": removed.cluster,
                "serial": removed.serial,
                "not_after": iso(removed.not_after),
                "output": removed.output,
                "kubeconfig": removed.kubeconfig,
                "revoked": [str(info.serial) for info in removed.revoked],
            }
        )
        return
    typer.echo(
        f"removed cluster {removed.cluster}: intermediate {removed.serial[:16]} is no longer "
        f"renewed (expires {iso(removed.not_after)})"
    )
    for info in removed.revoked:
        typer.echo(f"  revoked {info.serial} (cessationOfOperation)")
    warn_crl_skipped(removed.revoked)
    where = f"kubectl:{removed.kubeconfig}" if removed.kubeconfig else removed.output
    if where:
        typer.echo(f"  its output {where} is left as it is")


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
