"""A throwaway PostgreSQL cluster for what the shared server cannot show, and test certificates.

The shared server on 127.0.0.1:5432 uses trust authentication and has ssl off;
changing its pg_hba.conf would affect everyone on the machine. So password
authentication (cleartext, md5, SCRAM-SHA-256) and server-side TLS are tested
against a private cluster: ``initdb`` into a temp dir (as the ``postgres``
user when run as root), started on a free port on 127.0.0.1, ``fsync=off``,
stopped with ``-m immediate`` and deleted afterwards. About one second to set up.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import ipaddress
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import free_port

PASSWORD = "s3cret-Pw_for-tests"
ROLES = {"scramuser": "scram-sha-256", "md5user": "md5", "pwuser": "password"}


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (PEM cert, PEM key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


class PrivateCluster:
    """``with PrivateCluster() as pg: pg.port`` -- password auth per role, optional ssl."""

    def __init__(self, ssl_cert: Path | None = None, ssl_key: Path | None = None) -> None:
        self.ssl_cert = ssl_cert
        self.ssl_key = ssl_key
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sniff-pg-"))
        self.data = self.dir / "data"
        self.bindir = _bindir()

    @staticmethod
    def unavailable() -> str | None:
        """Why a private cluster cannot be made here, or None."""
        if _bindir() is None:
            return "initdb not found under /usr/lib/postgresql/*/bin"
        if os.geteuid() != 0 and shutil.which("initdb") is None:
            return "needs root (to run initdb as the postgres user)"
        return None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)

    def start(self) -> PrivateCluster:
        assert self.bindir is not None
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        pw = self.dir / "pw"
        pw.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(pw, "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pw}",
            "--no-sync",
        )
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.dir}'",
            "fsync = off",
            "max_connections = 20",
            "shared_buffers = 16MB",
            "shared_preload_libraries = 'pg_stat_statements'",  # a server-side ground truth
            "pg_stat_statements.track_utility = off",
        ]
        if self.ssl_cert and self.ssl_key:
            for src, dst in ((self.ssl_cert, "server.crt"), (self.ssl_key, "server.key")):
                shutil.copy(src, self.data / dst)
                (self.data / dst).chmod(0o600)
                if os.geteuid() == 0:
                    shutil.chown(self.data / dst, "postgres")
            conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n".join(conf) + "\n")
        hba = ["local all all trust"]
        hba += [f"host all {role} 127.0.0.1/32 {method}" for role, method in ROLES.items()]
        hba += ["host all all 127.0.0.1/32 scram-sha-256"]
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        # one session, so SET password_encryption applies to the role created after it
        sql = (
            f"SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD '{PASSWORD}';"
            " SET password_encryption = 'scram-sha-256';"
            f" CREATE ROLE scramuser LOGIN PASSWORD '{PASSWORD}';"
            f" CREATE ROLE pwuser LOGIN PASSWORD '{PASSWORD}';"
            " CREATE EXTENSION pg_stat_statements;"
        )
        self._run(
            str(self.bindir / "psql"), "-h", str(self.dir), "-p", str(self.port), "-U",
            "postgres", "-d", "postgres", "-qc", sql,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if self.bindir is not None and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
                )
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
