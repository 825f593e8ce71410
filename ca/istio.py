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
import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from sqlmodel import Session, select

from ca.authority import MESH, active_issuer, no_such_authority
from ca.cas import ca_certificate, ca_signer, find_ca
from ca.checks import check_ca
from ca.config import Context
from ca.crl import current_crl
from ca.durations import Ttl
from ca.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    NotInitialised,
    TrellisError,
    Unavailable,
)
from ca.files import (
    check_writable,
    private_directory,
    replacing_together,
    stored_path,
    write_atomic,
    write_private,
    written_path,
)
from ca.identity import TrustDomain
from ca.istio_crl import CRL_FILE, crl_bundle, intermediate_crl
from ca.keys import KeyType, PrivateKey
from ca.kubectl import KubeTarget, apply, check_target, dns_label
from ca.pem import certs_pem, private_key_pem
from ca.profiles import (
    BACKDATE,
    CaSpec,
    RevocationUrls,
    ca_builder,
    istio_subject,
    sign,
)
from ca.records import record_issued
from ca.serial import Serial
from ca.store.models import AuthorityRow, CaRow, CertificateRow, IstioClusterRow

__all__ = [
    "FORMATS",
    "MIN_TTL",
    "RENEWAL_INTERVAL",
    "IstioIntermediate",
    "IstioParams",
    "check_output",
    "deliver",
    "issue_istio_intermediate",
    "mesh_config",
    "render",
    "renew_due_clusters",
    "root_configmap",
    "write_output",
]

log = logging.getLogger("trellis.istio")

FORMATS = ("secret-yaml", "tls-secret-yaml", "files")
_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")  # of --format files
ISTIO_KEY_TYPES = (
    KeyType.EC_P256,
    KeyType.EC_P384,
    KeyType.RSA_2048,
    KeyType.RSA_3072,
    KeyType.RSA_4096,
)
DEFAULT_TTL = Ttl(30 * 86400)
# The shortest intermediate: the job renews at 2/3 of its life and runs every 5 minutes
# (``RENEWAL_INTERVAL``), so an hour leaves 20 minutes, four runs, to renew and deliver in; a
# shorter one (10 s was accepted) expired before any run could renew it, and istiod with it.
MIN_TTL = Ttl(3600)
MAX_KUBE_CONTEXT = 253  # istio_cluster.kube_context
# Renew when this share of an intermediate's life has passed; istiod hot-reloads the Secret and
# clamps workload TTLs to the intermediate's remaining life, so a third left is plenty.
RENEW_AFTER = 2 / 3
# How often the ``istio-intermediates`` job runs, and how soon a cluster whose delivery failed
# gets another intermediate: not at each of the scheduler's quicker retries of the failed run
# (10 s, 20 s, ...), since every attempt issues an active CA certificate whose key is lost if
# the delivery fails again. The slack lets the next scheduled run, which starts one interval
# after the previous run started (the failed issuance came a little later), retry it.
RENEWAL_INTERVAL = dt.timedelta(minutes=5)
_RETRY_SLACK = dt.timedelta(seconds=30)
# The CRL-only update of a kubectl target applies just ``data.ca-crl.pem``; under its own field
# manager, because server-side apply would drop every other key the ``trellis`` manager owns.
CRL_FIELD_MANAGER = "trellis-crl"


@dataclass(frozen=True, slots=True)
class IstioParams:
    """One cluster's intermediate and where it goes.

    The output is either a path (``output``: a YAML file, or a directory for ``files``) or a
    ``kubectl apply`` target (``kubeconfig`` and optionally ``kube_context``), never both: the
    key exists in exactly one place outside istiod, and with a kubeconfig that place is the
    cluster's Secret store, not a local file next to it. With neither, a renewal keeps the
    cluster's recorded output (API callers that write the result themselves).

    ``with_crl`` adds ``ca-crl.pem`` (``ca.istio_crl``); istiod reads it only in the
    ``cacerts`` form, so it is refused with ``tls-secret-yaml``.
    """

    cluster: str
    key_type: KeyType = KeyType.EC_P256
    ttl: Ttl = DEFAULT_TTL
    output: Path | None = None
    output_format: str = "secret-yaml"
    authority: str = MESH
    kubeconfig: Path | None = None
    kube_context: str | None = None
    with_crl: bool = False

    def __post_init__(self) -> None:
        dns_label(self.cluster, "a cluster name")
        if self.ttl.seconds < MIN_TTL.seconds:
            raise InvalidInput(
                f"--ttl {self.ttl} is too short for an Istio intermediate: at least {MIN_TTL}, "
                "so that the istio-intermediates job (every 5 minutes) renews it in time"
            )
        if self.key_type not in ISTIO_KEY_TYPES:
            raise InvalidInput(
                f"istiod does not support {self.key_type.value} CA keys: use ec-p256, ec-p384 "
                "or rsa-2048/3072/4096"
            )
        if self.output_format not in FORMATS:
            raise InvalidInput(f"--format is one of {', '.join(FORMATS)}")
        if self.output is not None and self.kubeconfig is not None:
            raise InvalidInput("give either --out or --kubeconfig: an output is one or the other")
        if self.kube_context is not None and self.kubeconfig is None:
            raise InvalidInput("--kube-context needs --kubeconfig")
        if self.kubeconfig is not None and self.output_format == "files":
            raise InvalidInput("--kubeconfig applies a Secret: use secret-yaml or tls-secret-yaml")
        # as recorded for renewals (istio_cluster.output, .kubeconfig, .kube_context)
        if self.output is not None:
            stored_path(self.output.resolve(), "the output path")
        if self.kubeconfig is not None:
            stored_path(self.kubeconfig.resolve(), "the kubeconfig path")
        if self.kube_context is not None and len(self.kube_context) > MAX_KUBE_CONTEXT:
            raise InvalidInput(f"a kube context is at most {MAX_KUBE_CONTEXT} characters")
        if self.with_crl and self.output_format == "tls-secret-yaml":
            raise InvalidInput(
                "--with-crl needs --format secret-yaml or files: istiod reads ca-crl.pem only "
                "from the cacerts form (ca-cert.pem, ca-key.pem), never next to tls.crt/tls.key"
            )

    @property
    def kube(self) -> KubeTarget | None:
        if self.kubeconfig is None:
            return None
        return KubeTarget(self.kubeconfig, self.kube_context)


@dataclass(frozen=True, slots=True)
class IstioIntermediate:
    cluster: str
    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # the intermediate, then up to and including its root
    roots: tuple[x509.Certificate, ...]  # every current trust anchor (both during root rotation)
    crl_pem: bytes | None = None  # ca-crl.pem: a CRL for each CA of the chain (--with-crl)
    # The cluster was not recorded before this issuance: if this first delivery fails, the
    # cluster is forgotten again rather than retried (``deliver``).
    new_cluster: bool = False

    @property
    def files(self) -> dict[str, bytes]:
        """The ``cacerts`` keys istiod reads (``_FILES``, the four present together), and
        ``ca-crl.pem`` when it was asked for."""
        files = {
            "ca-cert.pem": certs_pem([self.certificate]),
            "ca-key.pem": private_key_pem(self.key),
            "cert-chain.pem": certs_pem(self.chain),
            "root-cert.pem": certs_pem(self.roots),
        }
        if self.crl_pem is not None:
            files[CRL_FILE] = self.crl_pem
        return files

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


def _active_root(ctx: Context, authority: str) -> CaRow:
    with Session(ctx.engine) as session:
        try:
            return find_ca(session, authority, "root")
        except NotFound:
            raise NotInitialised(f"authority {authority!r} has no active root") from None


def check_output(params: IstioParams) -> None:
    """Refuse an output the intermediate could not be delivered to, before one is issued: its
    key exists only in that delivery, so an intermediate issued for a path that cannot be
    written (a directory where the YAML file goes, a file where the ``files`` directory goes, a
    read-only place) would be an active CA certificate whose key is lost. A kubectl target
    needs what can be known without the cluster (``ca.kubectl.check_target``): a readable
    kubeconfig that kubectl loads, kubectl on the PATH, the context in it; whether the cluster
    answers only applying tells. The job judges a recorded cluster the same way each run, so a
    kubeconfig whose context was removed costs no intermediate per run."""
    if params.output is not None:
        directory = params.output_format == "files"
        check_writable(params.output, directory=directory, what=f"the output {params.output}")
        if directory:  # a file of it that is a link to stdout is no place for the key either
            for name in (*_FILES, CRL_FILE):
                written_path(params.output / name)
    kube = params.kube
    if kube is None:
        return
    if not (kube.kubeconfig.is_file() and os.access(kube.kubeconfig, os.R_OK)):
        raise InvalidInput(f"--kubeconfig {kube.kubeconfig}: not a readable file")
    check_target(kube)


class _Superseded(Conflict):
    """The record a renewal was made for is gone (``trellis istio remove``) or was replaced (an
    ``istio issue``) while the job worked: the renewal is dropped, nothing recorded."""


def issue_istio_intermediate(
    ctx: Context, params: IstioParams, actor: str = "cli", *, renewal_of: str | None = None
) -> IstioIntermediate:
    """Sign a fresh intermediate (and, with ``with_crl``, its CRL) and record the cluster.

    Nothing is delivered here: ``deliver`` writes or applies the result. The output is checked
    first (``check_output``), so none is issued that could not be delivered. ``renewal_of``
    (the job's) is the serial the cluster's record held when the job read it: the renewal is
    recorded only if it still does, so a removed cluster is not recorded again.
    """
    check_output(params)
    issuer = active_issuer(ctx, params.authority)  # for the bundle and the trust domain
    now = ctx.clock.now()
    root = _active_root(ctx, params.authority)
    assert root.id is not None  # a stored row
    root_crl = current_crl(ctx, params.authority, root.serial) if params.with_crl else None
    root_cert = ca_certificate(ctx, root)
    key = params.key_type.generate()
    td = issuer.spiffe_trust_domain()
    spec = CaSpec(
        subject=istio_subject(td.name, params.cluster),
        public_key=key.public_key(),
        spiffe_id=td.id(),
        serial=Serial.generate(),
        not_before=now - BACKDATE,
        not_after=min(now + params.ttl.delta, root_cert.not_valid_after_utc),
        path_length=0,
        issuer=root_cert,
        digital_signature=True,
        # docs/revocation.md: intermediates point at the root's CRL, as ``ca.authority``'s
        # do; istiod's were the one kind that did not, so a relying party that follows CDP
        # or OCSP found nothing to ask about a revoked cluster intermediate.
        urls=(
            RevocationUrls.under(ctx.settings.public_url, params.authority, root_cert.serial_number)
            if ctx.settings.public_url
            else None
        ),
    )
    cert = sign(ca_builder(spec), ca_signer(ctx, root))
    check_ca(cert, root_cert, td.id())
    own_crl = intermediate_crl(cert, key, params.key_type, now) if root_crl else None
    with Session(ctx.engine) as session:
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
        previous = session.get(IstioClusterRow, params.cluster, with_for_update=True)
        new_cluster = previous is None
        if renewal_of is not None and (previous is None or previous.serial != renewal_of):
            raise _Superseded(f"cluster {params.cluster}: removed or re-issued meanwhile")
        output = str(params.output.resolve()) if params.output else None
        kube = params.kube
        kubeconfig = str(kube.kubeconfig.resolve()) if kube else None
        kube_context = kube.context if kube else None
        if previous is not None:
            if output is None and kubeconfig is None:
                output, kubeconfig = previous.output, previous.kubeconfig
                kube_context = previous.kube_context
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
                kubeconfig=kubeconfig,
                kube_context=kube_context,
                with_crl=params.with_crl,
                intermediate_crl_pem=own_crl.decode() if own_crl else None,
                root_crl_number=root_crl.number if root_crl else None,
            )
        )
        session.commit()
    crl_pem = crl_bundle(own_crl, root_crl) if own_crl and root_crl else None
    return IstioIntermediate(
        params.cluster,
        cert,
        key,
        (cert, root_cert),
        issuer.roots,
        crl_pem=crl_pem,
        new_cluster=new_cluster,
    )


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
    """Write atomically: a file for the YAML forms, a directory for ``files``; keys 0600.

    The files of a directory replace the old ones together or not at all
    (``replacing_together``), whatever stops them, Ctrl-C included: written one after the
    other, a failure part way left a new ``ca-key.pem`` beside the old ``ca-cert.pem``, a pair
    istiod cannot load. The key goes first, so that a reload on the certificate's change finds
    it. The intermediate of a failed write is not revoked: the caller records the failure and
    the job issues another (``deliver``, ``renew_due_clusters``)."""
    rendered = render(intermediate, output_format)
    if output_format != "files":
        write_private(out, rendered["cacerts.yaml"])
        return [out]
    private_directory(out)  # 0700, or an existing one that others may write to tightened
    order = sorted(rendered, key=lambda name: not name.endswith("key.pem"))
    files = {
        out / name: (rendered[name], 0o600 if name.endswith("key.pem") else 0o644) for name in order
    }
    with replacing_together(files):
        pass
    return [out / name for name in rendered]


def _record_delivery(ctx: Context, cluster: str, error: str | None, **changes: Any) -> None:
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, cluster, with_for_update=True)
        if row is None:
            return
        row.last_error = error[:512] if error else None
        for name, value in changes.items():
            setattr(row, name, value)
        session.add(row)
        session.commit()


def _failure(exc: Exception) -> TrellisError:
    if isinstance(exc, TrellisError):
        return exc
    detail = getattr(exc, "strerror", None) or type(exc).__name__
    return Unavailable(f"the output could not be written: {detail}")


def deliver(ctx: Context, intermediate: IstioIntermediate, params: IstioParams) -> list[str]:
    """Put the intermediate where ``params`` say: written paths, or kubectl's summary.

    A failure is re-raised as a ``TrellisError``. For a cluster Trellis already serves (a
    re-issue) it is recorded on the cluster (``istio list`` shows it), and the
    ``istio-intermediates`` job re-issues it on its run ``RENEWAL_INTERVAL`` later: istiod
    holds the previous intermediate and needs the next one. A cluster's first delivery is
    different: nothing of it reached istiod that Trellis knows of, and the command said it
    failed (exit 8), so the cluster is not kept (``_forget``), as a failed ``step ca
    certificate`` leaves nothing behind; else a target that never worked (a cluster that does
    not exist, a kubeconfig for another one) got a new intermediate every 5 minutes, forever.
    Either way the key of the undelivered intermediate is gone (it was never stored) and its
    certificate stays recorded, to be revoked if wanted.
    """
    try:
        return _deliver(intermediate, params)
    except (TrellisError, OSError) as exc:
        error = _failure(exc)
        if intermediate.new_cluster and _forget(ctx, intermediate):
            note = f"cluster {intermediate.cluster} is not recorded (issue it again)"
            error.detail, error.public = f"{error.detail}; {note}", f"{error.public}; {note}"
            error.args = (error.detail,)
            raise error from None
        _record_delivery(ctx, intermediate.cluster, error.detail)
        raise error from None
    except BaseException as exc:
        # Ctrl-C (``cli.launch.Interrupted``) or a bug: a re-issue is recorded all the same, or
        # the cluster would pass for delivered and the job leave it until its intermediate is
        # due; a first delivery is forgotten, as when it fails.
        if not (intermediate.new_cluster and _forget(ctx, intermediate)):
            _record_delivery(ctx, intermediate.cluster, f"not delivered: {type(exc).__name__}")
        raise


def _forget(ctx: Context, intermediate: IstioIntermediate) -> bool:
    """Drop the cluster recorded by ``intermediate``'s issuance, unless another issuance has
    replaced it since (its serial differs: that one's delivery decides)."""
    serial = format(intermediate.certificate.serial_number, "x")
    with Session(ctx.engine) as session:
        row = session.get(IstioClusterRow, intermediate.cluster, with_for_update=True)
        if row is None or row.serial != serial:
            return False
        session.delete(row)
        session.commit()
    return True


def _deliver(intermediate: IstioIntermediate, params: IstioParams) -> list[str]:
    """``deliver`` without recording a failure, for callers that record it themselves."""
    if params.kube is not None:
        manifest = render(intermediate, params.output_format)["cacerts.yaml"]
        return [f"{apply(params.kube, manifest)} ({params.kube.describe()})"]
    if params.output is not None:
        return [str(p) for p in write_output(intermediate, params.output_format, params.output)]
    return []


def root_configmap(ctx: Context, namespace: str = "istio-system", authority: str = MESH) -> str:
    """The ``istio-ca-root-cert`` ConfigMap workloads read their trust anchors from."""
    dns_label(namespace, "--namespace")
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
    trust, polled from the SPIFFE bundle endpoint when Trellis has a public URL (https only)."""
    with Session(ctx.engine) as session:
        auth = session.get(AuthorityRow, authority)
    if auth is None:
        raise no_such_authority(authority)
    td = TrustDomain(auth.trust_domain)
    public_url = ctx.settings.public_url
    if public_url and not public_url.lower().startswith("https://"):
        # istiod (pkg/spiffe RetrieveSpiffeBundleRootCerts) puts https:// before any endpoint
        # not starting with it: http://ca.example.org would be fetched from the host "http",
        # and the mesh would load no trust anchors. Trust anchors over plain HTTP are no
        # better; the inline PEM is one unset variable away.
        raise InvalidInput(
            f"TRELLIS_PUBLIC_URL {public_url[:80]!r} is not https://, and istiod fetches "
            "spiffeBundleUrl over https only: give an https:// public URL, or run with "
            "TRELLIS_PUBLIC_URL= for the bundle inline (pem)"
        )
    if public_url:
        source: dict[str, Any] = {"spiffeBundleUrl": f"{public_url.rstrip('/')}/v1/bundle.jwks"}
    else:
        source = {"pem": active_issuer(ctx, authority).bundle_pem.decode()}
    document = {
        "meshConfig": {
            "trustDomain": td.name,
            "caCertificates": [{**source, "trustDomains": [td.name]}],
        }
    }
    return _yaml(document)


def _params(row: IstioClusterRow) -> IstioParams:
    return IstioParams(
        cluster=row.cluster,
        key_type=KeyType(row.key_type),
        # A cluster recorded before MIN_TTL existed is renewed with at least it.
        ttl=Ttl(max(row.ttl_seconds, MIN_TTL.seconds)),
        output=Path(row.output) if row.output else None,
        output_format=row.output_format,
        authority=row.authority,
        kubeconfig=Path(row.kubeconfig) if row.kubeconfig else None,
        kube_context=row.kube_context,
        with_crl=row.with_crl,
    )


def _refresh_crl(ctx: Context, row: IstioClusterRow) -> str | None:
    """Put the root's current CRL into ``ca-crl.pem`` of the cluster's output if it changed
    since it was delivered (a revocation, or the daily re-signing); the intermediate's own CRL,
    kept from issue time, stays. Needs no key: the YAML forms are rewritten one data key at a
    time, a kubectl target gets only ``data.ca-crl.pem`` applied."""
    with Session(ctx.engine) as session:
        issued = session.get(CertificateRow, row.serial)
        root = session.get(CaRow, issued.issuer_ca_id) if issued else None
    if root is None or row.intermediate_crl_pem is None:
        return None
    crl = current_crl(ctx, row.authority, root.serial)
    if crl.number == row.root_crl_number:
        return None
    content = crl_bundle(row.intermediate_crl_pem.encode(), crl)
    params = _params(row)
    if params.kube is not None:
        patch = _secret("cacerts", "istio-system", {CRL_FILE: content}, "Opaque")
        del patch["type"]  # owned by the full apply; a partial apply leaves it alone
        apply(params.kube, _yaml(patch).encode(), field_manager=CRL_FIELD_MANAGER)
    elif params.output is not None and row.output_format == "files":
        write_atomic(params.output / CRL_FILE, content)
    elif params.output is not None:
        not_ours = Unavailable(
            f"{params.output} is not the cacerts Secret Trellis wrote",
            public=f"cluster {row.cluster}: its output is not the cacerts Secret Trellis wrote",
        )
        try:
            document = yaml.safe_load(params.output.read_text())
        except yaml.YAMLError:
            # Not chained: a YAML error quotes the lines around it, which in this file
            # are the base64 of ca-key.pem, and the scheduler logs a failure's traceback.
            raise not_ours from None
        if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
            raise not_ours
        document["data"][CRL_FILE] = base64.b64encode(content).decode()
        write_private(params.output, _yaml(document).encode())
    else:
        return None
    _record_delivery(ctx, row.cluster, None, root_crl_number=crl.number)
    return f"{row.cluster}: {CRL_FILE} now with root CRL #{crl.number}"


def renew_due_clusters(ctx: Context) -> list[str]:
    """The scheduler's job: re-issue every recorded cluster's intermediate past 2/3 of its life,
    or whose last delivery failed at least ``RENEWAL_INTERVAL`` ago, into the output it was
    issued to (istiod hot-reloads an intermediate under the same root); for the others with
    ``ca-crl.pem``, refresh the root's CRL in it. An output that cannot be written fails its
    cluster without an intermediate being issued. Clusters are independent: one failing is
    recorded on its row, the others go on, and the run fails at the end (``trellis jobs list``,
    ``/readyz``) naming every cluster whose delivery is still failing."""
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        rows = [
            row
            for row in session.exec(select(IstioClusterRow)).all()
            if row.output or row.kubeconfig
        ]
    # Each failing cluster twice: for the log and the CLI (its detail, which can name its
    # output's path) and for the run's record, read over HTTP (/readyz, GET /v1/jobs).
    done, failed, failing = [], [], []
    for row in rows:
        due = row.not_before + (row.not_after - row.not_before) * RENEW_AFTER
        retry = row.updated_at + RENEWAL_INTERVAL - _RETRY_SLACK
        try:
            if row.last_error is not None and now < retry:
                failed.append(f"{row.cluster}: {row.last_error} (retried from {retry:%H:%M:%S})")
                failing.append(f"{row.cluster} (retried from {retry:%H:%M:%S})")
            elif now >= due or row.last_error is not None:
                params = _params(row)
                intermediate = issue_istio_intermediate(
                    ctx, params, actor="scheduler", renewal_of=row.serial
                )
                _deliver(intermediate, params)  # a failure is recorded once, below
                serial = format(intermediate.certificate.serial_number, "x")
                done.append(f"renewed {row.cluster} -> {serial[:12]}")
            elif row.with_crl and (refreshed := _refresh_crl(ctx, row)):
                done.append(refreshed)
        except _Superseded:
            continue  # its record says what to do now, at the next run
        except (TrellisError, OSError) as exc:
            error = _failure(exc)
            _record_delivery(ctx, row.cluster, error.detail)
            failed.append(f"{row.cluster}: {error.detail}")
            failing.append(row.cluster)
        except Exception as exc:
            # Nobody foresaw it (a bug, a library's error): escaping, it skipped the clusters
            # after this one and left this one unrecorded, passing for delivered, so neither
            # retried nor alerted on. Its traceback is for the server log; the row and the
            # run's result (``istio list``, ``trellis jobs list``) get its type only.
            log.exception("istio cluster %s: the renewal failed unexpectedly", row.cluster)
            detail = f"unexpected {type(exc).__name__} (logged with its traceback)"
            _record_delivery(ctx, row.cluster, detail)
            failed.append(f"{row.cluster}: {detail}")
            failing.append(row.cluster)
    if failed:
        raise Unavailable(
            "; ".join(failed),
            public=f"delivery failing: {', '.join(failing)} (trellis istio list)",
        )
    return done
