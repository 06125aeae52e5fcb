"""TLS for ``https`` listeners: the configured certificate, or one sniff makes.

Strategy. sniff terminates client TLS itself (the event loop's TLS, uvloop's
when installed), so an HTTP/1.1 client over TLS still gets the fast path; ALPN
offers ``h2`` and ``http/1.1`` (``h2`` only when the ``http2`` option is on) and
an ``h2`` connection is then handed, already decrypted, to the embedded
mitmproxy.

Without ``tls_cert``/``tls_key``, sniff keeps a small private CA under
``<state_dir>/tls/`` (made once, EC P-256, ten years) and issues one leaf
certificate per listener from it, valid for ``localhost``, ``127.0.0.1``,
``::1``, the host name and the listen address. Clients trust ``ca.pem`` (the
path and commands are printed at start); nothing is written anywhere else.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

CA_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"


def _names(listen_host: str) -> tuple[list[str], list[str]]:
    dns = ["localhost"]
    ips = ["127.0.0.1", "::1"]
    host = socket.gethostname()
    for name in (host, listen_host):
        if not name:
            continue
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if name not in dns:
                dns.append(name)
        else:
            if name not in ips and name not in ("0.0.0.0", "::"):
                ips.append(name)
    return dns, ips


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_ca(tls_dir: Path) -> tuple[Path, Path]:
    """The sniff CA (cert, key) under ``tls_dir``, created when absent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tls_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = tls_dir / CA_NAME, tls_dir / CA_KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sniff"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"sniff local CA ({socket.gethostname()})"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def ensure_leaf(tls_dir: Path, label: str, listen_host: str) -> tuple[Path, Path, Path]:
    """(cert, key, CA cert) for a listener, issued by the sniff CA when absent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert_path, ca_key_path = ensure_ca(tls_dir)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    cert_path, key_path = tls_dir / f"{safe}.pem", tls_dir / f"{safe}-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path, ca_cert_path
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    dns, ips = _names(listen_host)
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[-1])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, ca_cert_path


def server_context(cert: str | Path, key: str | Path, http2: bool) -> ssl.SSLContext:
    """The listener's TLS context: TLS 1.2+, ALPN h2 (when enabled) and http/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    return ctx


def trust_hint(ca: Path) -> str:
    return (
        f"clients must trust {ca}: curl --cacert {ca} ...; requests/httpx verify={str(ca)!r}; "
        f"system-wide: cp {ca} /usr/local/share/ca-certificates/sniff-ca.crt && update-ca-certificates"
    )
