"""Our private signing keys on disk (RS384 and ES384), their rotation, and the public JWK Set we publish."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.clock import utc_now
from app.private_files import tighten

log = logging.getLogger(__name__)

ALGORITHMS = ("RS384", "ES384")
DEFAULT_GRACE = timedelta(hours=24)
INDEX_FILE = "keys.json"
_KID = re.compile(r"[A-Za-z0-9_-]{1,128}")
LOCK_FILE = ".lock"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class NoSigningKey(LookupError):
    """No active signing key for an algorithm: run ``flask --app app keys generate``."""


@dataclass(frozen=True)
class KeyRecord:
    """One entry of the index: which key, for which algorithm, and when it stops being published."""

    kid: str
    alg: str
    created_at: datetime
    retire_at: datetime | None  # None: the active signing key for its alg

    def published(self, now: datetime) -> bool:
        return self.retire_at is None or self.retire_at > now

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "alg": self.alg,
            "created_at": self.created_at.isoformat(),
            "retire_at": self.retire_at.isoformat() if self.retire_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        retire = data.get("retire_at")
        if not _KID.fullmatch(str(data["kid"])):
            raise ValueError("a kid in the index is not base64url")  # it names a file: no path tricks
        return cls(
            kid=str(data["kid"]),
            alg=str(data["alg"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            retire_at=datetime.fromisoformat(retire) if retire else None,
        )


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_fixed(value: int, size: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode("ascii")


def public_jwk_members(private_key: PrivateKey) -> dict[str, str]:
    """The required public members of a key's JWK (RFC 7518 section 6), and nothing private."""
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP384R1):
        numbers = public.public_numbers()
        return {"kty": "EC", "crv": "P-384", "x": _b64url_fixed(numbers.x, 48), "y": _b64url_fixed(numbers.y, 48)}
    raise TypeError(f"unsupported key type {type(private_key).__name__}")


def thumbprint(members: dict[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): a kid that any party can recompute from the public key."""
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode("ascii")
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode("ascii")


def _new_private_key(alg: str) -> PrivateKey:
    if alg == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unsupported signing algorithm {alg!r} (use one of {', '.join(ALGORITHMS)})")


class KeyStore:
    """Private keys in ``directory`` (0700; each key a 0600 PEM file) and an index (``keys.json``) naming the
    active key per algorithm and when retired keys stop being published. Readers in other processes pick up a
    rotation on their next call: the index is re-read whenever the file was replaced."""

    def __init__(self, directory: Path, grace: timedelta = DEFAULT_GRACE):
        self.directory = Path(directory)
        self.grace = grace
        self._lock = threading.Lock()  # guards the in-memory caches
        self._writer = threading.Lock()  # one writer per process; the flock covers other processes
        self._records: list[KeyRecord] = []
        self._stamp: tuple[int, int] | None = None
        self._private: dict[str, PrivateKey] = {}
        self._public: dict[str, dict[str, str]] = {}

    # ----- reading

    def records(self, now: datetime | None = None) -> list[KeyRecord]:
        """The published keys (active, or retiring after ``now``), newest first."""
        now = utc_now(now)
        return [r for r in self._load() if r.published(now)]

    def signing_key(self, alg: str) -> tuple[str, PrivateKey]:
        """The active key for ``alg``: (kid, private key)."""
        for record in self._load():
            if record.alg == alg and record.retire_at is None:
                try:
                    return record.kid, self._private_key(record.kid)
                except (OSError, ValueError):
                    break
        raise NoSigningKey(f"no usable {alg} signing key in {self.directory}: run `flask --app app keys generate`")

    def jwks(self, now: datetime | None = None) -> dict[str, list[dict[str, str]]]:
        """The public JWK Set: active keys and retired keys still inside their grace period; public members only."""
        keys = []
        for record in self.records(now):
            try:
                members = self._public_members(record.kid)
            except (OSError, ValueError):
                log.warning("signing key %s in the index cannot be read; it is left out of the JWKS", record.kid)
                continue
            keys.append({"kid": record.kid, "alg": record.alg, "use": "sig", **members})
        return {"keys": keys}

    def usable(self) -> bool:
        """True when every supported algorithm has an active key that loads."""
        try:
            for alg in ALGORITHMS:
                self.signing_key(alg)
        except NoSigningKey:
            return False
        return True

    # ----- writing

    def ensure(self) -> bool:
        """Generate keys only when there is no usable set (and prune expired ones); True when it generated."""
        with self._write_lock():
            now = utc_now()
            self._prune_locked(now)
            if self.usable():
                return False
            self._generate_locked(now)
        return True

    def generate(self, now: datetime | None = None) -> list[str]:
        """New RS384 and ES384 keys become the active signing keys; the previous active keys stay published for
        the grace period, and keys past their retire_at are deleted. Returns the new kids."""
        with self._write_lock():
            return self._generate_locked(utc_now(now))

    def prune(self, now: datetime | None = None) -> list[str]:
        """Delete keys whose retire_at has passed; returns their kids."""
        with self._write_lock():
            return self._prune_locked(utc_now(now))

    def _prune_locked(self, now: datetime) -> list[str]:
        records = self._read_index()
        gone = [r.kid for r in records if not r.published(now)]
        if gone:
            self._write_index([r for r in records if r.published(now)])
            self._delete_files(gone)
            self._stamp = None
        return gone

    def _generate_locked(self, now: datetime) -> list[str]:
        records = [r for r in self._read_index() if self._key_path(r.kid).exists()]  # a lost file: nothing to publish
        retire_at = now + self.grace
        records = [r if r.retire_at else KeyRecord(r.kid, r.alg, r.created_at, retire_at) for r in records]
        expired = [r.kid for r in records if not r.published(now)]
        records = [r for r in records if r.published(now)]
        new = []
        for alg in ALGORITHMS:
            key = _new_private_key(alg)
            kid = thumbprint(public_jwk_members(key))
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            self._atomic_write(self._key_path(kid), pem)
            new.append(KeyRecord(kid, alg, now, None))
        self._write_index(new + records)
        self._delete_files(expired)
        self._stamp = None
        log.info("generated signing keys %s; %d older key(s) retiring", ", ".join(r.kid for r in new), len(records))
        return [r.kid for r in new]

    # ----- files

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)  # mkdir's mode is masked by the umask, and an old directory may be wider

    @contextlib.contextmanager
    def _write_lock(self):
        """Serialise writers across threads and processes (the CLI may rotate while workers run)."""
        self._ensure_directory()
        with self._writer:
            fd = os.open(self.directory / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock
                self._stamp = None

    def _key_path(self, kid: str) -> Path:
        return self.directory / f"{kid}.pem"

    def _atomic_write(self, path: Path, data: bytes) -> None:
        """Write a temporary 0600 file beside ``path``, then rename it over: readers see old or new, never half."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")  # mkstemp creates files 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _write_index(self, records: list[KeyRecord]) -> None:
        body = json.dumps({"keys": [r.to_json() for r in records]}, indent=2) + "\n"
        self._atomic_write(self.directory / INDEX_FILE, body.encode("utf-8"))

    def _delete_files(self, kids: list[str]) -> None:
        for kid in kids:
            with contextlib.suppress(FileNotFoundError):
                self._key_path(kid).unlink()
            self._private.pop(kid, None)
            self._public.pop(kid, None)

    def _read_index(self) -> list[KeyRecord]:
        make_private(self.directory)
        make_private(self.directory / INDEX_FILE)
        try:
            data = json.loads((self.directory / INDEX_FILE).read_text(encoding="utf-8"))
            return [KeyRecord.from_json(entry) for entry in data["keys"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError):
            log.error("the signing key index %s is unreadable; treating it as empty", self.directory / INDEX_FILE)
            return []

    def _load(self) -> list[KeyRecord]:
        """The index, re-read only when the file was replaced since the last read."""
        try:
            st = os.stat(self.directory / INDEX_FILE)
            stamp = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp is None:
                self._records, self._stamp = [], None
            elif stamp != self._stamp:
                self._records, self._stamp = self._read_index(), stamp
            return list(self._records)

    def _private_key(self, kid: str) -> PrivateKey:
        key = self._private.get(kid)
        if key is None:
            make_private(self._key_path(kid))
            loaded = serialization.load_pem_private_key(self._key_path(kid).read_bytes(), password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise ValueError(f"key {kid} is not an RSA or EC private key")
            key = self._private[kid] = loaded
        return key

    def _public_members(self, kid: str) -> dict[str, str]:
        members = self._public.get(kid)
        if members is None:
            members = self._public[kid] = public_jwk_members(self._private_key(kid))
        return members


def make_private(path: Path) -> None:
    """Tighten a key file or folder that others can read (made by hand, copied, or under another umask), with a
    warning; one that cannot be changed is logged, and still used."""

    try:
        mode = tighten(path)
    except OSError as exc:
        log.error("%s is readable by other users and cannot be made private (%s)", path, exc.strerror)
        return
    if mode is not None:
        log.warning("%s was mode %04o; took away other users' access (it holds signing keys)", path, mode)
