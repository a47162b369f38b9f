"""What a deployment's processes prove themselves with, made on this machine for loopback runs and drills.

- A certificate authority and one server certificate for the SuperLink and the edge servers (TLS on
  every link: Flower's Fleet and Control API, and each ``dpa serve``). An operator brings their own
  instead (``docs/federation.md``); these are for one machine.
- An EC P-384 key pair per SuperNode, in the OpenSSH formats Flower reads (``flwr supernode register``
  takes the public key, ``flower-supernode --auth-supernode-private-key`` the private one).
- Per edge server, a token file with one operator token (its bridge) and one token per device.

Private keys are written 0600, every file whole (``dpa.base.atomic``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dpa.base.atomic import atomic_write_bytes

__all__ = ["TlsFiles", "make_tls", "make_node_key", "BRIDGE"]

BRIDGE = "bridge"  # the operator token's name in every edge server's token file (dpa serve --operator bridge)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # what every client trusts
    cert: Path  # the servers' certificate (127.0.0.1, ::1, localhost)
    key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    if private:
        os.chmod(path, 0o600)
    return path


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dpa"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")) -> TlsFiles:
    """A CA and a server certificate for ``hosts``, valid for a year (loopback runs; bring your own for machines)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("dpa deployment CA"))
        .issuer_name(_name("dpa deployment CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return TlsFiles(
        ca=_write(folder / "ca.pem", ca.public_bytes(pem)),
        cert=_write(folder / "server.pem", cert.public_bytes(pem)),
        key=_write(
            folder / "server.key",
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            private=True,
        ),
    )


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of one SuperNode, OpenSSH formats, EC P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    ssh = serialization.Encoding.OpenSSH
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode()
    return _write(folder / name, private, private=True), _write(folder / f"{name}.pub", public)
