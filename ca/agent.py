"""``trellis agent``: keeps a workload's SVID files valid, with no human in the loop.

The loop (SPIRE agent and ``step ca renew --daemon`` are the references):
- bootstrap: renew the SVID already in the directory if it is unexpired and matches its key (the
  server's answer tells whether it is still valid: not revoked, its entry still there), else
  request one with the join token; without either, fail at once with a clear message;
- a renewal refused for good (401, 403) is not retried: the join token bootstraps again at once,
  or, without one, the agent exits with that refusal; a server that cannot be reached for that
  bootstrap (or once the SVID has expired) is retried with the back-off, only the token's own
  refusal ends the agent;
- renew at half the lifetime with ±5 % jitter (Istio's 0.5 ± 0.01, a little wider so a fleet
  restarted together spreads out), with a fresh key each time;
- refresh the bundle on every renewal and every ``bundle_refresh`` in between, so a rotated or
  added root is known before anything is signed by it;
- publish files atomically (``ca.workload.write_svid``), run the reload command after each change,
  for a bounded time and never past a stop (``ReloadCommand.run``);
- on errors back off exponentially (1 s … 60 s), but never by more than a quarter of the time the
  SVID has left (at least 1 s), so retries come closer together as it nears expiry and one lands
  soon after the server is back; keep the old SVID until a new one is in hand; once it has
  expired, fall back to the join token (retried as above), or without one give up (exit 3);
- wait in short slices, so a stop (SIGTERM from a kubelet with a 30-second grace) is seen
  within a second, even in the middle of a back-off; a request in progress is abandoned too
  (``ca.serverconn``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ca import errors
from ca.clock import Clock, SystemClock
from ca.keys import KeyType
from ca.serverconn import ServerUrl, Stopped
from ca.workload import SvidFiles, WorkloadClient, read_svid, write_bundle

__all__ = ["Agent", "AgentConfig", "ReloadCommand"]

log = logging.getLogger("trellis.agent")

RENEW_FRACTION = 0.5
JITTER = 0.05
MAX_BACKOFF = 60.0
MIN_RETRY = 1.0  # the closest retries come together as expiry nears
EXPIRY_SHARE = 0.25  # a retry waits at most this share of the SVID's remaining life
SLICE = 0.5  # the longest stretch of sleep between two looks at the stop flag
HOOK_LIMIT = 30.0  # the longest an --exec hook may run, in seconds ...
HOOK_SHARE = 0.25  # ... and at most this share of the new SVID's remaining life (at least 1 s)
HOOK_POLL = 0.1  # how often a running hook's agent looks at the stop flag
HOOK_GRACE = 0.5  # between SIGTERM and SIGKILL to a hook that overran or is stopped
# Refusals a retry cannot change (401: revoked, expired, unknown; 403: minted, entry deleted or
# disabled), unlike a server that cannot be reached.
_PERMANENT = (errors.AuthenticationFailed, errors.PermissionDenied)


@dataclass(frozen=True, slots=True)
class ReloadCommand:
    """The ``--exec`` hook. Parsed and looked up when the agent starts, so that a typo is
    reported before a join token is spent; once running, a hook that fails or cannot run is a
    warning: the SVID is on disk either way, and the agent must go on renewing it."""

    argv: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> ReloadCommand:
        try:
            argv = tuple(shlex.split(text))
        except ValueError as exc:
            raise errors.InvalidInput(f"--exec {text!r}: {exc}") from None
        if not argv:
            raise errors.InvalidInput("--exec is empty: give the command to run after a change")
        if shutil.which(argv[0]) is None:
            where = "is not an executable file" if "/" in argv[0] else "is not on PATH"
            raise errors.InvalidInput(f"--exec: {argv[0]} {where}")
        return cls(argv)

    def run(self, *, limit: float, stop: Callable[[], bool]) -> None:
        """Run the hook for at most ``limit`` seconds, and only while ``stop()`` is false: the
        agent waited for it with no bound, so a hook that hung held a SIGTERM (a kubelet's
        30-second grace) and every renewal after it, until the SVID expired. One that overruns
        or is stopped is killed, with its process group (a shell's children too), and warned
        about; the agent goes on either way."""
        try:
            process = subprocess.Popen(self.argv, start_new_session=True)
        except OSError as exc:  # removed or made unexecutable since the agent started
            log.warning("reload command %s cannot run: %s", self.argv[0], exc.strerror or exc)
            return
        deadline = time.monotonic() + limit
        try:
            while process.poll() is None:
                if stop():
                    log.warning("reload command %s stopped with the agent", self.argv[0])
                    _end(process)
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "reload command %s did not finish within %.0f s: killed",
                        self.argv[0],
                        limit,
                    )
                    _end(process)
                    return
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(min(left, HOOK_POLL))
        except BaseException:
            _end(process)
            raise
        if process.returncode != 0:
            log.warning("reload command exited %d", process.returncode)


def _end(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the hook's process group, SIGKILL to what is left of it a moment later."""
    for sig, grace in ((signal.SIGTERM, HOOK_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        if grace is None:
            process.wait()
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
            return


@dataclass(frozen=True, slots=True)
class AgentConfig:
    server: ServerUrl  # parsed when the agent starts: a bad one is exit 2, not a retry at half-life
    bundle: Path  # the trust bundle to recognise the server by at bootstrap
    directory: Path
    token: str | None = None
    exec_command: ReloadCommand | None = None
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


# Writes that fail the same way however often they are tried: a directory (or a file) where a
# file or link must go, a loop, a name too long, a rename across file systems.
_LASTING = frozenset({errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EXDEV})


def _retryable(raised: errors.TrellisError | OSError) -> errors.TrellisError:
    """A file the agent could not write (a full disk, a volume gone read-only) is retried like
    a server that cannot be reached: the SVID directory is swapped whole (``..data``), so the
    one on disk is still the last good one, and it stays usable while it lives. The agent
    exited on it, and with it the workload's renewals.

    A write that cannot succeed on a retry (``_LASTING``: a ``..data`` that became a directory,
    say) raises ``InvalidInput`` instead, for the operator to mend: each retry had the server
    sign a certificate whose key was then thrown away, and spent a join-token use for it."""
    if isinstance(raised, errors.TrellisError):
        return raised
    # os.replace names the staged file first and the one it could not replace second.
    filename = raised.filename2 or raised.filename
    where = f"{filename}: " if filename else ""
    detail = f"cannot write the SVID files: {where}{raised.strerror or raised}"
    if raised.errno in _LASTING:
        raise errors.InvalidInput(detail) from None
    return errors.Unavailable(detail)


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
        self.unusable = "none there"  # why the SVID on disk is not used, for messages
        self._stop: Callable[[], bool] = lambda: False

    def _client(self) -> WorkloadClient:
        # Once files exist, their bundle (kept fresh) is what recognises the server.
        if self.files.bundle.exists():
            bundle, name = self.files.bundle, str(self.files.bundle)
        else:
            bundle, name = self.config.bundle, f"--bundle {self.config.bundle}"
        return WorkloadClient(
            self.config.server, bundle, clock=self.clock, bundle_name=name, stop=self._stop
        )

    def current(self) -> Held | None:
        """The SVID on disk, if it is readable, matches its key and has not expired; else None,
        with the reason in ``self.unusable``."""
        try:
            cert, _key = read_svid(self.files)
        except errors.InvalidInput as exc:
            self.unusable = exc.detail
            return None
        now = self.clock.now()
        if cert.not_valid_after_utc <= now:
            self.unusable = f"the SVID in {self.config.directory} has expired"
            return None
        return Held(now, cert.not_valid_after_utc, cert.serial_number)

    def _published(self, what: str) -> Held:
        """The SVID just written, read back, and then the ``--exec`` hook run. Read before the
        hook, not after: a hook that took longer than the SVID's life left an expired one to
        read, which ended the agent (``InternalError``) although it had just been renewed. The
        hook gets ``HOOK_SHARE`` of the life left (at most ``HOOK_LIMIT``), so the renewal at
        half-life is never waited out."""
        held = self.current()
        if held is None:
            raise errors.InternalError("the SVID just written cannot be read back")
        self._changed(what, held)
        return held

    def _changed(self, what: str, held: Held | None) -> None:
        """Logged, and the ``--exec`` hook run for its share of ``held``'s life left (at least
        ``MIN_RETRY`` seconds: also when there is no usable SVID to count from)."""
        log.info("%s: %s", what, self.files.svid)
        if self.config.exec_command is not None:
            life = (held.not_after - self.clock.now()).total_seconds() if held else 0.0
            limit = min(HOOK_LIMIT, max(MIN_RETRY, life * HOOK_SHARE))
            self.config.exec_command.run(limit=limit, stop=self._stop)

    def bootstrap(self) -> Held:
        """At start: the SVID on disk if the server still renews it, else one from the token.

        An unexpired SVID whose key matches is not enough: it may have been revoked, or its
        entry deleted or disabled, which only the server knows. Renewing it at once asks (and
        hands the workload a full lifetime): a permanent refusal (401, 403) is treated as in the
        loop (``_replace``). A server it cannot reach leaves the question open: the SVID on
        disk is used, with a warning, and renewed on the usual schedule."""
        held = self.current()
        if held is None:
            return self._enrol()
        try:
            return self.renew()
        except _PERMANENT as refused:
            return self._replace(refused)
        except (errors.TrellisError, OSError) as raised:
            log.warning(
                "%s; using the SVID in %s (serial %x) until it can be renewed",
                _retryable(raised).detail,
                self.config.directory,
                held.serial,
            )
            return held

    def _enrol(self) -> Held:
        """A new SVID with the join token. At start without a usable SVID it is tried once: a
        server it cannot reach then (a wrong ``--server``, one not deployed yet) is exit 8 for
        the operator or the supervisor to see. Once the agent has run into a refusal or an
        expiry, ``_enrol_again`` retries it."""
        if not self.config.token:
            raise errors.InvalidInput(
                f"no valid SVID in {self.config.directory} ({self.unusable}) "
                "and no --token to bootstrap with"
            )
        received = self._client().request(
            self.config.token, self.config.directory, self.config.key_type
        )
        log.info("obtained %s serial %s", received.spiffe_id, received.serial)
        return self._published("obtained")

    def _replace(self, refused: errors.TrellisError) -> Held:
        """The server refuses for good to renew the SVID (revoked, minted, its entry deleted or
        disabled): retrying until notAfter would keep a revoked certificate in use for the rest
        of its life. The join token is the only way to a valid one, at once."""
        if not self.config.token:
            raise type(refused)(
                f"{refused.detail}; the SVID cannot be renewed and there is no --token to "
                "bootstrap again"
            )
        log.warning("%s; bootstrapping again with the join token", refused.detail)
        return self._enrol_again()

    def _enrol_again(self) -> Held:
        """The join token, for an agent whose SVID was refused or has expired. A server it
        cannot reach, an answer that is not an SVID or files it cannot write are retried with
        the back-off (1 s ... 60 s), as they are for a renewal: the agent exited 8 on them,
        although the token may well work once the server is back. Only a refusal of the token
        itself (401, 403: spent, expired, its entry gone) ends it, as nothing else could."""
        backoff = 1.0
        while True:
            try:
                return self._enrol()
            except _PERMANENT:
                raise
            except (errors.TrellisError, OSError) as raised:
                log.warning("%s; retrying in %.0f s", _retryable(raised).detail, backoff)
                self._pause(backoff, self._stop)
                if self._stop():
                    raise Stopped from None
                backoff = min(backoff * 2, MAX_BACKOFF)

    def renew(self) -> Held:
        received = self._client().renew(self.config.directory)
        self.renewals += 1
        log.info(
            "renewed %s serial %s, expires %s",
            received.spiffe_id,
            received.serial,
            received.expires_at,
        )
        return self._published("renewed")

    def refresh_bundle(self) -> bool:
        bundle = self._client().fetch_bundle()
        if self.files.bundle.read_bytes() == bundle:
            return False
        write_bundle(self.files, bundle)
        # The SVID is not new: the hook's time is counted from the one held, and one that
        # cannot be read (expired meanwhile) is no reason to end the agent here.
        self._changed("bundle updated", self.current())
        return True

    def run(self, *, once: bool = False, stop: Callable[[], bool] = lambda: False) -> None:
        """Until ``stop()``: also in the middle of a request (``ca.serverconn.Stopped``)."""
        self._stop = stop
        try:
            self._run(once, stop)
        except Stopped:
            log.info("stopped")

    def _run(self, once: bool, stop: Callable[[], bool]) -> None:
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
                except _PERMANENT as refused:
                    held = self._replace(refused)
                    renew_at = held.renew_at(self.rng)
                    next_bundle = self.clock.now() + self.config.bundle_refresh
                    backoff = 1.0
                    continue
                except (errors.TrellisError, OSError) as raised:
                    exc = _retryable(raised)
                    if self.clock.now() >= held.not_after:
                        held = self._recover(exc)
                        renew_at = held.renew_at(self.rng)
                        next_bundle = self.clock.now() + self.config.bundle_refresh
                        backoff = 1.0
                        continue
                    pause = self._retry_pause(backoff, held)
                    log.warning("%s; retrying in %.0f s", exc.detail, pause)
                    self._pause(pause, stop)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
            wait = min(renew_at, next_bundle) - self.clock.now()
            self.sleep(max(0.05, min(wait.total_seconds(), SLICE)))

    def _retry_pause(self, backoff: float, held: Held) -> float:
        """The back-off, but no more than a share of the life the SVID has left: a server back
        shortly before notAfter is tried again in time, instead of after a 32-second back-off
        that outlasts the SVID and costs a join-token use (or, with the token spent, the
        workload's identity)."""
        left = (held.not_after - self.clock.now()).total_seconds()
        return max(MIN_RETRY, min(backoff, left * EXPIRY_SHARE))

    def _pause(self, seconds: float, stop: Callable[[], bool]) -> None:
        """Sleep in slices: a signal handler can only set a flag, and a sleep it interrupts
        resumes (PEP 475), so one long sleep would hold a SIGTERM for the whole back-off."""
        remaining = seconds
        while remaining > 0 and not stop():
            step = min(remaining, SLICE)
            self.sleep(step)
            remaining -= step

    def _recover(self, cause: errors.TrellisError) -> Held:
        """The SVID expired before it could be renewed: the join token is the only way back."""
        if not self.config.token:
            raise errors.AuthenticationFailed(
                f"the SVID expired and could not be renewed ({cause.detail}); "
                "no --token to bootstrap again"
            )
        log.warning(
            "%s; the SVID has expired: bootstrapping again with the join token", cause.detail
        )
        return self._enrol_again()
