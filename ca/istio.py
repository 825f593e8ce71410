"""Trellis as the upstream root of Istio meshes: plug-in CA intermediates for istiod.

istiod signs workload certificates with an intermediate and key it reads from the ``cacerts``
Secret in ``istio-system`` (istio/istio security/pkg/pki/ca, util/keycertbundle.go). Trellis
issues that intermediate under its trust domain's root, so mesh workloads and Trellis SVIDs share
one root and verify each other. The key must leave Trellis (istiod needs it): it is generated
here, handed out once, and never stored by Trellis.

istiod's checks, which the profile satisfies: the chain verifies to a root with Go's verifier (so
no EKU on the CA), the key matches, it is a CA, nothing is expired; Ed25519 keys are unsupported.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlmodel import Session, col, select

from ca.authority import MESH, active_issuer
from ca.cas import ca_certificate, ca_signer
from ca.checks import check_ca
from ca.config import Context
from ca.durations import Ttl
from ca.errors import InvalidInput, NotInitialised
from ca.files import write_atomic, write_private
from ca.identity import TrustDomain
from ca.keys import KeyType, PrivateKey
from ca.pem import certs_pem, private_key_pem
from ca.profiles import BACKDATE, CaSpec, ca_builder, sign
from ca.records import record_issued
from ca.serial import Serial
from ca.store.models import AuthorityRow, CaRow, IstioClusterRow

__all__ = [
    "FORMATS",
    "IstioIntermediate",
    "IstioParams",
    "issue_istio_intermediate",
    "mesh_config",
    "render",
    "renew_due_clusters",
    "root_configmap",
    "write_output",
]

FORMATS = ("secret-yaml", "tls-secret-yaml", "files")
ISTIO_KEY_TYPES = (
    KeyType.EC_P256,
    KeyType.EC_P384,
    KeyType.RSA_2048,
    KeyType.RSA_3072,
    KeyType.RSA_4096,
)
DEFAULT_TTL = Ttl(30 * 86400)
# Renew when this share of an intermediate's life has passed; istiod hot-reloads the Secret and
# clamps workload TTLs to the intermediate's remaining life, so a third left is plenty.
RENEW_AFTER = 2 / 3
_CLUSTER = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class IstioParams:
    cluster: str
    key_type: KeyType = KeyType.EC_P256
    ttl: Ttl = DEFAULT_TTL
    output: Path | None = None
    output_format: str = "secret-yaml"
    authority: str = MESH

    def __post_init__(self) -> None:
        if not _CLUSTER.match(self.cluster):
            raise InvalidInput("a cluster name is a DNS label: a-z, 0-9 and '-', at most 63")
        if self.key_type not in ISTIO_KEY_TYPES:
            raise InvalidInput(
                f"istiod does not support {self.key_type.value} CA keys: use ec-p256, ec-p384 "
                "or rsa-2048/3072/4096"
            )
        if self.output_format not in FORMATS:
            raise InvalidInput(f"--format is one of {', '.join(FORMATS)}")


@dataclass(frozen=True, slots=True)
class IstioIntermediate:
    cluster: str
    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # the intermediate, then up to and including its root
    roots: tuple[x509.Certificate, ...]  # every current trust anchor (both during root rotation)

    @property
    def files(self) -> dict[str, bytes]:
        """The ``cacerts`` keys istiod reads (all four present together)."""
        return {
            "ca-cert.pem": certs_pem([self.certificate]),
            "ca-key.pem": private_key_pem(self.key),
            "cert-chain.pem": certs_pem(self.chain),
            "root-cert.pem": certs_pem(self.roots),
        }

    @property
    def tls_files(self) -> dict[str, bytes]:
        """The alternative ``tls.crt``/``tls.key``/``ca.crt`` form (as cert-manager writes it)."""
        return {
            "tls.crt": certs_pem(self.chain[:-1] or self.chain),
            "tls.key": private_key_pem(self.key),
            "ca.crt": certs_pem(self.roots),
        }


class _Dumper(yaml.SafeDumper):
    """PEM blocks as YAML literal blocks (``|``), the way people write them by hand."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(document: dict[str, Any]) -> str:
    return str(yaml.dump(document, Dumper=_Dumper, sort_keys=False))


def _subject(trust_domain: str, cluster: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"istio {trust_domain}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"istio-{cluster}"),
        ]
    )


def issue_istio_intermediate(
    ctx: Context, params: IstioParams, actor: str = "cli"
) -> IstioIntermediate:
    issuer = active_issuer(ctx, params.authority)  # for the bundle and the trust domain
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        root = session.exec(
            select(CaRow)
            .where(
                CaRow.authority == params.authority, CaRow.role == "root", CaRow.state == "active"
            )
            .order_by(col(CaRow.not_after).desc())
        ).first()
        if root is None or root.id is None:
            raise NotInitialised(f"authority {params.authority!r} has no active root")
        root_cert = ca_certificate(ctx, root)
        key = params.key_type.generate()
        td = issuer.spiffe_trust_domain()
        spec = CaSpec(
            subject=_subject(td.name, params.cluster),
            public_key=key.public_key(),
            spiffe_id=td.id(),
            serial=Serial.random(),
            not_before=now - BACKDATE,
            not_after=min(now + params.ttl.delta, root_cert.not_valid_after_utc),
            path_length=0,
            issuer=root_cert,
            digital_signature=True,
        )
        cert = sign(ca_builder(spec), ca_signer(ctx, root))
        check_ca(cert, root_cert, td.id())
        record_issued(
            session,
            cert,
            authority=params.authority,
            issuer_ca_id=root.id,
            profile="istio-intermediate",
            identity=str(td.id()),
            requested_by=f"{actor} (istio cluster {params.cluster})",
            now=now,
            detail={"cluster": params.cluster},
        )
        previous = session.get(IstioClusterRow, params.cluster)
        output = str(params.output.resolve()) if params.output else None
        if previous is not None:
            output = output or previous.output
            session.delete(previous)
            session.flush()
        session.add(
            IstioClusterRow(
                cluster=params.cluster,
                authority=params.authority,
                serial=format(cert.serial_number, "x"),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                key_type=params.key_type.value,
                ttl_seconds=params.ttl.seconds,
                output=output,
                output_format=params.output_format,
                updated_at=now,
            )
        )
        session.commit()
    return IstioIntermediate(params.cluster, cert, key, (cert, root_cert), issuer.roots)


def _secret(name: str, namespace: str, files: dict[str, bytes], kind: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "trellis"},
        },
        "type": kind,
        "data": {key: base64.b64encode(value).decode() for key, value in files.items()},
    }


def render(intermediate: IstioIntermediate, output_format: str) -> dict[str, bytes]:
    """File name → content. Never includes ``istio-generated`` (that marks a self-signed CA)."""
    if output_format == "files":
        return intermediate.files
    if output_format == "secret-yaml":
        document = _secret("cacerts", "istio-system", intermediate.files, "Opaque")
    else:
        document = _secret("cacerts", "istio-system", intermediate.tls_files, "kubernetes.io/tls")
    return {"cacerts.yaml": _yaml(document).encode()}


def write_output(intermediate: IstioIntermediate, output_format: str, out: Path) -> list[Path]:
    """Write atomically: a file for the YAML forms, a directory for ``files``; keys 0600."""
    rendered = render(intermediate, output_format)
    if output_format != "files":
        write_private(out, rendered["cacerts.yaml"])
        return [out]
    written = []
    for name, content in rendered.items():
        path = out / name
        (write_private if name.endswith("key.pem") else write_atomic)(path, content)
        written.append(path)
    return written


def root_configmap(ctx: Context, namespace: str = "istio-system", authority: str = MESH) -> str:
    """The ``istio-ca-root-cert`` ConfigMap workloads read their trust anchors from."""
    roots = active_issuer(ctx, authority).bundle_pem.decode()
    document = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "istio-ca-root-cert", "namespace": namespace},
        "data": {"root-cert.pem": roots},
    }
    return _yaml(document)


def mesh_config(ctx: Context, authority: str = MESH) -> str:
    """The ``meshConfig`` for a mesh that trusts Trellis: its trust domain, and the bundle to
    trust, polled from the SPIFFE bundle endpoint when Trellis has a public URL."""
    with Session(ctx.engine) as session:
        auth = session.get(AuthorityRow, authority)
    if auth is None:
        raise NotInitialised(f"authority {authority!r} does not exist")
    td = TrustDomain(auth.trust_domain)
    if ctx.settings.public_url:
        source: dict[str, Any] = {
            "spiffeBundleUrl": f"{ctx.settings.public_url.rstrip('/')}/v1/bundle.jwks"
        }
    else:
        source = {"pem": active_issuer(ctx, authority).bundle_pem.decode()}
    document = {
        "meshConfig": {
            "trustDomain": td.name,
            "caCertificates": [{**source, "trustDomains": [td.name]}],
        }
    }
    return _yaml(document)


def renew_due_clusters(ctx: Context) -> list[str]:
    """The scheduler's job: re-issue every recorded cluster's intermediate past 2/3 of its life,
    into the output it was issued to (istiod hot-reloads an intermediate under the same root)."""
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        rows = [row for row in session.exec(select(IstioClusterRow)).all() if row.output]
    renewed = []
    for row in rows:
        due = row.not_before + (row.not_after - row.not_before) * RENEW_AFTER
        if now < due:
            continue
        assert row.output is not None
        params = IstioParams(
            cluster=row.cluster,
            key_type=KeyType(row.key_type),
            ttl=Ttl(row.ttl_seconds),
            output=Path(row.output),
            output_format=row.output_format,
            authority=row.authority,
        )
        intermediate = issue_istio_intermediate(ctx, params, actor="scheduler")
        write_output(intermediate, row.output_format, Path(row.output))
        renewed.append(
            f"{row.cluster} -> {format(intermediate.certificate.serial_number, 'x')[:12]}"
        )
    return renewed
