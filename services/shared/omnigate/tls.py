"""Transport security for both services: certificates from files, followed as the files change.

Server side: ``server_credentials`` builds ``grpc.dynamic_ssl_server_credentials``. gRPC asks its fetcher
for the certificate configuration before every new TLS handshake; the fetcher (``ReloadingFiles``, which the
gateway's HTTPS API uses too) checks the files at most once per ``check_interval_s`` (a few ``stat`` calls)
and re-reads them when one changed, so a renewed certificate (cert-manager, a Kubernetes Secret volume
updated through its ``..data`` symlink swap) is used by new connections without a restart. Connections
already open keep the certificate they were made with. Files that fail to load (half written, key and
certificate not matching) are logged once and the previous certificate stays in use until a good pair
appears.

Client side: ``channel_credentials`` reads the files once; a channel keeps its credentials for its
lifetime, so callers compare ``files_version`` of the same files over time and open new channels when it
changes (see ``omnigate_gateway.workers.channels.credentials_version``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

log = logging.getLogger(__name__)

# How often a file change is looked for: new connections may use the old certificate for this long.
CHECK_INTERVAL_S = 1.0

FileVersion = tuple[tuple[int, int, int, int] | None, ...]
T = TypeVar("T")


class TlsConfigError(ValueError):
    """Certificate, key or CA files that are missing or unusable; the message names the file and why."""


def files_version(paths: Sequence[str | None]) -> FileVersion:
    """A value that changes whenever one of the files changes (replaced, rewritten, re-linked, removed).

    ``os.stat`` follows symlinks, so a Kubernetes Secret volume update (a new ``..data`` directory swapped
    in) shows up as a new inode.
    """
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        if path is None:
            out.append(None)
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TlsConfigError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    if not data.strip():
        raise TlsConfigError(f"the {what} file {path} is empty")
    return data


def _certificates(data: bytes, path: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(f"the {what} file {path} holds no PEM certificate") from None
    return certs


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate chain and its private key, checked to belong together."""

    certificate_chain: bytes
    private_key: bytes


def load_key_pair(cert_file: str, key_file: str) -> KeyPair:
    """Reads a certificate chain and its key; raises TlsConfigError unless the key matches the certificate."""
    chain = _read(cert_file, "certificate")
    key = _read(key_file, "private key")
    leaf = _certificates(chain, cert_file, "certificate")[0]
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise TlsConfigError(f"the private key file {key_file} holds no unencrypted PEM key ({e})") from None
    if _public_bytes(private_key.public_key()) != _public_bytes(leaf.public_key()):
        raise TlsConfigError(f"the private key in {key_file} does not match the certificate in {cert_file}")
    return KeyPair(chain, key)


def load_ca(ca_file: str) -> bytes:
    """Reads PEM CA certificates (one or more); raises TlsConfigError when there are none."""
    data = _read(ca_file, "CA")
    _certificates(data, ca_file, "CA")
    return data


def _public_bytes(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class ReloadingFiles(Generic[T]):
    """Something loaded from files (a certificate configuration, an SSL context), loaded again when they
    change: what both the gRPC port and the HTTP API use to follow renewed certificates.

    ``load`` runs once here (an error fails start-up) and its result is ``initial``. ``changed()`` looks at
    the files at most once per ``check_interval_s`` and, when they changed since the last load, loads them
    again: it returns the new value, or None to keep the current one. Files that fail to load with one of
    ``unusable`` are logged once (``label`` names them in the log) and refused until they change again.
    """

    def __init__(
        self,
        paths: Sequence[str | None],
        load: Callable[[], T],
        *,
        label: str = "TLS",
        check_interval_s: float = CHECK_INTERVAL_S,
        unusable: tuple[type[Exception], ...] = (TlsConfigError,),
    ) -> None:
        self._paths = tuple(paths)
        self._load = load
        self._label = label
        self._check_interval_s = check_interval_s
        self._unusable = unusable
        self._lock = threading.Lock()
        self._loaded_version = files_version(self._paths)
        self._refused_version: FileVersion | None = None
        self.initial = load()  # fails start-up on unusable files
        self._next_check = time.monotonic() + check_interval_s
        self.reloads = 0  # loads since start (tests, logs)

    def changed(self) -> T | None:
        """The files loaded again when they changed and load, else None (keep the current value).

        Runs before each TLS handshake; it must not raise.
        """
        try:
            with self._lock:
                now = time.monotonic()
                if now < self._next_check:
                    return None
                self._next_check = now + self._check_interval_s
                version = files_version(self._paths)
                if version == self._loaded_version or version == self._refused_version:
                    return None
                try:
                    loaded = self._load()
                except self._unusable as e:
                    self._refused_version = version
                    log.error(
                        "%s files changed but cannot be used (%s); keeping the previous certificate",
                        self._label,
                        e,
                    )
                    return None
                self._loaded_version = version
                self.reloads += 1
                log.info("%s certificate reloaded from %s", self._label, self._paths[0])
                return loaded
        except Exception:  # noqa: BLE001 - an exception here would fail the handshake
            log.exception("%s certificate check failed; keeping the previous certificate", self._label)
            return None


class ReloadingServerCertificates:
    """The server's certificate configuration, re-read from its files when they change.

    ``credentials()`` is what ``server.add_secure_port`` takes. With ``client_ca_file`` set, clients must
    present a certificate signed by one of its CAs (mutual TLS).
    """

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        client_ca_file: str | None = None,
        *,
        check_interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._files = ReloadingFiles(
            (cert_file, key_file, client_ca_file), self._load, check_interval_s=check_interval_s
        )

    @property
    def reloads(self) -> int:
        """Certificate configurations loaded since start (tests, logs)."""
        return self._files.reloads

    def _load(self) -> grpc.ServerCertificateConfiguration:
        pair = load_key_pair(self.cert_file, self.key_file)
        roots = load_ca(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(pair.private_key, pair.certificate_chain)], roots)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._files.initial,
            # gRPC's fetcher, run on a gRPC thread before each handshake. grpc documents that it returns None
            # to keep the current configuration; types-grpcio types it as always returning one.
            self._files.changed,  # type: ignore[arg-type]
            require_client_authentication=self.client_ca_file is not None,
        )


def server_credentials(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None = None
) -> grpc.ServerCredentials | None:
    """Server credentials that follow the files, or None for plaintext (no certificate configured).

    Raises TlsConfigError for an incomplete or unusable configuration (a clear start-up failure).
    """
    if not cert_file and not key_file:
        if client_ca_file:
            raise TlsConfigError(
                "a client CA is set but no server certificate and key: set both to serve TLS"
            )
        return None
    if not (cert_file and key_file):
        raise TlsConfigError("TLS needs both a certificate file and a key file")
    return ReloadingServerCertificates(cert_file, key_file, client_ca_file).credentials()


def channel_credentials(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca_file`` (None = the system's roots), present ``cert_file`` if set."""
    if bool(cert_file) != bool(key_file):
        raise TlsConfigError("a client certificate needs both a certificate file and a key file")
    roots = load_ca(ca_file) if ca_file else None
    if cert_file and key_file:
        pair = load_key_pair(cert_file, key_file)
        return grpc.ssl_channel_credentials(roots, pair.private_key, pair.certificate_chain)
    return grpc.ssl_channel_credentials(roots)
