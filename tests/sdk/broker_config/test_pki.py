"""The fleet CA and the certificates it issues."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sdk.broker_config.pki import create_ca, issue_client_cert, issue_server_cert

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def test_issue_server_cert_covers_the_host_and_loopback() -> None:
    ca = create_ca("ca", now=NOW)
    server = issue_server_cert(ca, hosts=["eu.example"], now=NOW, valid_days=10)
    cert = server.certificate
    cert.verify_directly_issued_by(ca.certificate)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["eu.example", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=10)
    assert cert.not_valid_before_utc < NOW
    assert isinstance(server.private_key, ec.EllipticCurvePrivateKey)
    assert b"BEGIN PRIVATE KEY" in server.key_pem and b"BEGIN CERTIFICATE" in server.cert_pem


def test_ip_host_is_an_ip_san_once() -> None:
    ca = create_ca("ca", now=NOW)
    sans = issue_server_cert(ca, hosts=["127.0.0.1"], now=NOW, valid_days=1).certificate.extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_ca_signs_leaves_only_and_client_cert_names_the_user() -> None:
    ca = create_ca("ca", now=NOW)
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    client = issue_client_cert(ca, username="eu-dev-0001", now=NOW, valid_days=5).certificate
    client.verify_directly_issued_by(ca.certificate)
    assert client.subject.rfc4514_string() == "CN=eu-dev-0001"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


def test_pki_refuses_naive_clock_and_empty_hosts() -> None:
    with pytest.raises(ValueError):
        create_ca("ca", now=dt.datetime(2030, 1, 1))
    with pytest.raises(ValueError):
        issue_server_cert(create_ca("ca", now=NOW), hosts=[], now=NOW, valid_days=1)
