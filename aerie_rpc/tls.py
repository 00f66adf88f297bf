"""TLS and mutual TLS on every gRPC link, in one place.

The settings are fields of each service's config (so each is a flag and an AERIE_* variable
like every other setting), shared through the mixins below:

- serving: `tls_cert` + `tls_key` put the node's port on TLS; `tls_client_ca` also requires
  each client to present a certificate signed by that CA (mutual TLS);
- dialing: `tls_ca` puts the node's outgoing calls on TLS, trusting servers whose certificate
  that CA signed; the node's own `tls_cert`/`tls_key` go along as its client certificate for
  servers that ask for one; `tls_server_name` checks the servers' certificates against that
  name instead of the host dialled.

Nothing set means plaintext both ways. `load_tls` reads and checks the files once, when a
service starts, so a wrong path or a key that does not fit its certificate ends the start
with one line instead of surfacing later as failed handshakes.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from aerie.errors import InputError
from aerie_rpc.config import option

GROUP = "TLS (all unset: plaintext)"


@dataclass
class TlsIdentity:
    tls_cert: str | None = option(
        None, "PEM certificate (chain): served to clients when serving, and shown to servers that ask for a client "
        "certificate", group=GROUP)
    tls_key: str | None = option(None, "PEM private key of --tls-cert (unencrypted)", group=GROUP)


@dataclass
class TlsServerOptions(TlsIdentity):
    tls_client_ca: str | None = option(
        None, "PEM CA bundle: require every client to present a certificate it signed (mutual TLS; needs "
        "--tls-cert)", group=GROUP)
    health_listen: str | None = option(
        None, "also answer gRPC health checks, and nothing else, in plaintext on this HOST:PORT (for probes that "
        "cannot speak TLS, such as kubelet's)", group=GROUP)


@dataclass
class TlsClientOptions(TlsIdentity):
    tls_ca: str | None = option(
        None, "PEM CA bundle: make outgoing calls over TLS, trusting the server certificates it signed",
        group=GROUP)
    tls_server_name: str | None = option(
        None, "expect this name in the servers' certificates instead of the host dialled (needs --tls-ca)",
        group=GROUP)


@dataclass
class TlsOptions(TlsServerOptions, TlsClientOptions):
    """Both sides, for a node that serves and calls on (draft, gateway)."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS material as read from the files (PEM bytes). The default is plaintext both ways."""

    cert: bytes | None = None
    key: bytes | None = None
    client_ca: bytes | None = None
    ca: bytes | None = None
    server_name: str | None = None

    @property
    def serving(self) -> bool:
        return self.cert is not None and self.key is not None

    @property
    def dialing(self) -> bool:
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self.serving:
            raise ValueError("no certificate and key to serve TLS with")
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if not self.dialing:
            raise ValueError("no CA to check servers' certificates against")
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def load_tls(options: object) -> TlsSettings:
    """Read and check the files named by the `tls_*` fields of a config (fields it lacks, and
    empty values, count as unset). Raises InputError naming the flag and the file."""
    cert, key, client_ca, ca, server_name = (getattr(options, name, None) or None for name in (
        "tls_cert", "tls_key", "tls_client_ca", "tls_ca", "tls_server_name"))
    if (cert is None) != (key is None):
        raise InputError("--tls-cert and --tls-key go together: give both, or neither")
    if client_ca and not cert:
        raise InputError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: a server that asks for "
                         "client certificates must serve TLS itself")
    if server_name and not ca:
        raise InputError("--tls-server-name needs --tls-ca: it names the certificate expected over TLS")
    settings = TlsSettings(
        cert=_read("--tls-cert", cert), key=_read("--tls-key", key), client_ca=_read("--tls-client-ca", client_ca),
        ca=_read("--tls-ca", ca), server_name=server_name,
    )
    if cert and key:
        _check_pair(cert, key)
    for flag, path in (("--tls-client-ca", client_ca), ("--tls-ca", ca)):
        if path:
            _check_ca(flag, path)
    return settings


def _read(flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


def _refuse_password() -> bytes:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key's passphrase;
    # gRPC cannot use such a key either.
    raise InputError("the key is encrypted: give --tls-key as an unencrypted PEM key")


def _check_pair(cert: str, key: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_refuse_password)
    except ssl.SSLError as e:
        raise InputError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key "
                         f"({e.reason or e})") from None
    except InputError as e:
        raise InputError(f"--tls-key {key}: {e}") from None


def _check_ca(flag: str, path: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as e:
        raise InputError(f"{flag} {path}: no PEM CA certificate in it ({e.reason or e})") from None
