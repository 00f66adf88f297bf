"""Test certificates, made fresh in a temporary directory: a CA, a node certificate it signed
(for serving and as a client certificate, like a pod's), a client-only certificate, one for
another name than the host dialled, and a second CA with a client certificate of its own."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_SANS = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
OTHER_NAME = "aerie-verify.internal"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    node: Pair  # loopback names, server and client use
    client: Pair  # client use only
    named: Pair  # OTHER_NAME only: dialling 127.0.0.1 needs a server-name override
    other_ca: Path
    other_client: Pair  # signed by other_ca


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))


def make_ca(where: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(name, name, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _write_cert(cert, where / f"{name}.crt"), key


def make_leaf(where: Path, name: str, ca: tuple[Path, ec.EllipticCurvePrivateKey], sans: tuple = (),
              server: bool = True, client: bool = True) -> Pair:
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (_builder(name, ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, key)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca[1], hashes.SHA256())
    return Pair(_write_cert(cert, where / f"{name}.crt"), _write_key(key, where / f"{name}.key"))


def make_pki(where: Path) -> Pki:
    ca = make_ca(where, "aerie-test-ca")
    other = make_ca(where, "other-ca")
    return Pki(
        ca=ca[0],
        node=make_leaf(where, "node", ca, LOOPBACK_SANS),
        client=make_leaf(where, "client", ca, server=False),
        named=make_leaf(where, "named", ca, (x509.DNSName(OTHER_NAME),)),
        other_ca=other[0],
        other_client=make_leaf(where, "other-client", other, server=False),
    )
