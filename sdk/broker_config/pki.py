"""A small fleet PKI: one CA, a server certificate per broker, optional client certificates.

Keys are ECDSA P-256 (fast to make, supported by every OpenSSL that Mosquitto
and paho link). The clock is a parameter so tests can pin validity windows.
Only key generation draws randomness; PEM encoding is left to the caller.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_BACKDATE = dt.timedelta(minutes=5)
"""Certificates start a little in the past so a peer whose clock lags still accepts them."""


@dataclass(frozen=True, kw_only=True)
class Credential:
    """A certificate and its private key."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM (protect the file, not the bytes)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: dt.datetime, valid_days: int) -> x509.CertificateBuilder:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_ca(common_name: str, *, now: dt.datetime, valid_days: int = 3650) -> Credential:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Credential(certificate=cert, private_key=key)


def _leaf(ca: Credential, common_name: str, usage: x509.ObjectIdentifier, *, now: dt.datetime,
          valid_days: int, sans: Sequence[x509.GeneralName]) -> Credential:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(common_name, ca.certificate.subject, key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return Credential(certificate=builder.sign(ca.private_key, hashes.SHA256()), private_key=key)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_cert(ca: Credential, *, hosts: Sequence[str], now: dt.datetime, valid_days: int) -> Credential:
    """A TLS server certificate for ``hosts`` (DNS names or IPs) plus localhost and 127.0.0.1."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    return _leaf(ca, names[0], ExtendedKeyUsageOID.SERVER_AUTH, now=now, valid_days=valid_days,
                 sans=[_general_name(h) for h in names])


def issue_client_cert(ca: Credential, *, username: str, now: dt.datetime, valid_days: int) -> Credential:
    """A TLS client certificate whose CN is the MQTT ``username`` (for mTLS listeners)."""
    return _leaf(ca, username, ExtendedKeyUsageOID.CLIENT_AUTH, now=now, valid_days=valid_days, sans=())
