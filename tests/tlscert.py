"""A throwaway TLS certificate for servers started by the integration tests."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path


def selfSignedPem(directory: Path) -> Path:
    """
    A self-signed certificate for localhost and its key, in one PEM file in ``directory``.

    One file serves both sides: an ``ssl:`` endpoint's ``privateKey=``, and
    a client's trust store (``clientContext``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = directory / "server.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    return pem


def clientContext(pem: Path) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate in ``pem``, as ``localhost``."""
    return ssl.create_default_context(cafile=str(pem))
