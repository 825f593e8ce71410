"""``trellis agent``: keeps a workload's SVID files valid, with no human in the loop.

The loop (SPIRE agent and ``step ca renew --daemon`` are the references):
- bootstrap: use the SVID already in the directory if it is valid, else request one with the
  join token; without either, fail at once with a clear message;
- renew at half the lifetime with ±5 % jitter (Istio's 0.5 ± 0.01, a little wider so a fleet
  restarted together spreads out), with a fresh key each time;
- refresh the bundle on every renewal and every ``bundle_refresh`` in between, so a rotated or
  added root is known before anything is signed by it;
- publish files atomically (``ca.workload.write_svid``), run the reload command after each change;
- on errors back off exponentially (1 s … 60 s) and keep the old SVID until a new one is in hand;
  once it has expired, fall back to the join token if it still works, else give up (exit 1).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import errors
from ca.clock import Clock, SystemClock
from ca.keys import KeyType
from ca.workload import SvidFiles, WorkloadClient, write_bundle

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger("trellis.agent")

RENEW_FRACTION = 0.5
JITTER = 0.05
MAX_BACKOFF = 60.0


@dataclass(frozen=True, slots=True)
class AgentConfig:
    server: str
    bundle: Path  # the trust bundle to recognise the server by at bootstrap
    directory: Path
    token: str | None = None
    exec_command: str | None = None
    key_type: KeyType = KeyType.EC_P256
    bundle_refresh: dt.timedelta = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Held:
    seen_at: dt.datetime  # when this agent obtained (or first read) the SVID
    not_after: dt.datetime
    serial: int

    def renew_at(self, rng: random.Random) -> dt.datetime:
        """Half of the life left when it was obtained. Not half of notAfter - notBefore: the
        issuer backdates notBefore for clock skew, which on short SVIDs is a large share."""
        fraction = RENEW_FRACTION + rng.uniform(-JITTER, JITTER)
        return self.seen_at + (self.not_after - self.seen_at) * fraction


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.files = SvidFiles(config.directory)
        self.clock = clock or SystemClock()
        self.sleep = sleep
        self.rng = rng or random.Random()  # noqa: S311 (jitter, not secrecy)
        self.renewals = 0

    def _client(self) -> WorkloadClient:
        # Once files exist, their bundle (kept fresh) is what recognises the server.
        bundle = self.files.bundle if self.files.bundle.exists() else self.config.bundle
        return WorkloadClient(self.config.server, bundle, clock=self.clock)

    def current(self) -> Held | None:
        """The SVID on disk, if it is readable, matches its key and has not expired."""
        try:
            cert = x509.load_pem_x509_certificates(self.files.svid.read_bytes())[0]
            key = serialization.load_pem_private_key(self.files.key.read_bytes(), None)
        except (OSError, ValueError, IndexError):
            return None
        if cert.public_key() != key.public_key():
            return None
        now = self.clock.now()
        if cert.not_valid_after_utc <= now:
            return None
        return Held(now, cert.not_valid_after_utc, cert.serial_number)

    def _changed(self, what: str) -> None:
        log.info("%s: %s", what, self.files.svid)
        if self.config.exec_command:
            result = subprocess.run(shlex.split(self.config.exec_command), check=False)
            if result.returncode != 0:
                log.warning("reload command exited %d", result.returncode)

    def bootstrap(self) -> Held:
        held = self.current()
        if held is not None:
            return held
        if not self.config.token:
            raise errors.InvalidInput(
                f"no valid SVID in {self.config.directory} and no --token to bootstrap with"
            )
        received = self._client().request(
            self.config.token, self.config.directory, self.config.key_type
        )
        log.info("obtained %s serial %s", received.spiffe_id, received.serial)
        self._changed("obtained")
        held = self.current()
        if held is None:
            raise errors.InternalError("the SVID just written cannot be read back")
        return held

    def renew(self) -> Held:
        received = self._client().renew(self.config.directory)
        self.renewals += 1
        log.info(
            "renewed %s serial %s, expires %s",
            received.spiffe_id,
            received.serial,
            received.expires_at,
        )
        self._changed("renewed")
        held = self.current()
        if held is None:
            raise errors.InternalError("the SVID just written cannot be read back")
        return held

    def refresh_bundle(self) -> bool:
        bundle = self._client().fetch_bundle()
        if self.files.bundle.read_bytes() == bundle:
            return False
        write_bundle(self.files, bundle)
        self._changed("bundle updated")
        return True

    def run(self, *, once: bool = False, stop: Callable[[], bool] = lambda: False) -> None:
        held = self.bootstrap()
        if once:
            return
        renew_at = held.renew_at(self.rng)
        next_bundle = self.clock.now() + self.config.bundle_refresh
        backoff = 1.0
        while not stop():
            now = self.clock.now()
            if now >= renew_at or now >= next_bundle:
                try:
                    if now >= renew_at:
                        held = self.renew()
                        renew_at = held.renew_at(self.rng)
                    else:
                        self.refresh_bundle()
                    next_bundle = self.clock.now() + self.config.bundle_refresh
                    backoff = 1.0
                except errors.TrellisError as exc:
                    log.warning("%s; retrying in %.0f s", exc.detail, backoff)
                    if self.clock.now() >= held.not_after:
                        held = self._recover(exc)
                        renew_at = held.renew_at(self.rng)
                    self.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
            wait = min(renew_at, next_bundle) - self.clock.now()
            self.sleep(max(0.05, min(wait.total_seconds(), 1.0)))

    def _recover(self, cause: errors.TrellisError) -> Held:
        """The SVID expired before it could be renewed: the join token is the only way back."""
        if not self.config.token:
            raise errors.AuthenticationFailed(
                f"the SVID expired and could not be renewed ({cause.detail}); "
                "no --token to bootstrap again"
            )
        return self.bootstrap()
