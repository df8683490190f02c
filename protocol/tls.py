"""Identities for mutual TLS: a federation CA, one certificate per party and coordinator, and
the gRPC credentials built from them.

Every certificate's subject common name is its holder's identity: a party agent authorizes
the caller named by the client certificate it verified, never an address or a header. Keys
are EC P-256 by default (RSA 3072 on request), certificates carry the given hosts as subject
alternative names and are valid for at most 365 days.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from amalgam.protocol.loading import ConfigError
from amalgam.protocol.schemas import TlsFiles

MAX_VALIDITY_DAYS = 365
IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
KEY_TYPES = ("ec", "rsa")
RSA_BITS = 3072


def _new_key(kind: str):
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"key type {kind!r}: choose one of {', '.join(KEY_TYPES)}")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _window(days: int, not_before: datetime.datetime | None):
    if not 1 <= days <= MAX_VALIDITY_DAYS:
        raise ValueError(f"days={days}: a certificate is valid for 1 to {MAX_VALIDITY_DAYS} days")
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return start, start + datetime.timedelta(days=days)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.pem`` and ``<stem>.key`` (readable by the owner only) in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        write_private(key, self.key_pem)
        return cert, key


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(
    name: str = "amalgam-federation-ca",
    *,
    days: int = MAX_VALIDITY_DAYS,
    key_type: str = "ec",
    not_before: datetime.datetime | None = None,
) -> Issued:
    """A self-signed certificate authority that signs every identity of one federation."""
    key = _new_key(key_type)
    start, end = _window(days, not_before)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
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
        )  # fmt: skip
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def _check_identity(identity: str) -> None:
    if not IDENTITY.fullmatch(identity):
        raise ValueError(
            f"identity {identity!r}: use letters, digits, '.', '_' and '-' (it names files)"
        )


def _certificate(ca: Issued, identity: str, public_key, hosts: list[str], days: int,
                 not_before: datetime.datetime | None) -> bytes:  # fmt: skip
    """The PEM certificate of ``public_key`` for ``identity``, signed by ``ca``: a TLS server
    (for ``hosts``, its subject alternative names) and client."""
    _check_identity(identity)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    start, end = _window(days, not_before)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_san(hosts or [identity]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def issue(
    ca: Issued,
    identity: str,
    hosts: list[str],
    *,
    days: int = MAX_VALIDITY_DAYS,
    key_type: str = "ec",
    not_before: datetime.datetime | None = None,
) -> Issued:
    """A new key and its certificate for ``identity`` (its subject common name) signed by
    ``ca``, usable as a TLS server (for ``hosts``, the subject alternative names) and as a TLS
    client."""
    _check_identity(identity)
    key = _new_key(key_type)
    cert = _certificate(ca, identity, key.public_key(), hosts, days, not_before)
    return Issued(cert, _pem_key(key))


def request(identity: str, hosts: list[str], key_type: str = "ec") -> tuple[bytes, bytes]:
    """A new private key and a certificate signing request for ``identity`` with ``hosts``
    (PEM, PEM): what an organization makes at home and sends to the federation's CA, keeping
    its key."""
    _check_identity(identity)
    key = _new_key(key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(identity))
        .add_extension(_san(hosts or [identity]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem_key(key), csr.public_bytes(serialization.Encoding.PEM)


def sign_request(ca: Issued, csr_pem: bytes, hosts: list[str] = (),
                 days: int = MAX_VALIDITY_DAYS) -> tuple[str, bytes]:  # fmt: skip
    """The identity (the request's common name) and a PEM certificate for an organization's
    certificate signing request, for the hosts it asks for plus ``hosts``. A request that is
    not PEM, whose signature does not verify, or without one valid common name raises
    ``ValueError``."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise ValueError("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise ValueError("its signature does not verify: it was altered or not signed by its key")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError("it must name exactly one identity as its common name (CN)")
    identity = str(names[0].value)
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        asked = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        asked += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        asked = []
    wanted = list(dict.fromkeys([*asked, *hosts])) or DEFAULT_HOSTS
    return identity, _certificate(ca, identity, csr.public_key(), wanted, days, None)


def token_digest(token: str) -> str:
    """``sha256:<hex>``: how a party's config stores a caller's bearer token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def identity_of(cert_pem: bytes) -> str:
    """The subject common name of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS for a party agent: its own certificate, and client certificates required and
    verified against the federation CA (gRPC negotiates TLS 1.2 or 1.3 only)."""
    return grpc.ssl_server_credentials(
        [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
        root_certificates=Path(tls.ca).read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """TLS for a coordinator: the parties' certificates verified against the CA, and its own
    certificate presented as the caller's identity."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca).read_bytes(),
        private_key=Path(tls.key).read_bytes(),
        certificate_chain=Path(tls.cert).read_bytes(),
    )


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The common name of the client certificate the server verified, or ``None`` on a
    connection without TLS client authentication."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None


def resolve_tls(tls: TlsFiles, config_path: Path) -> TlsFiles:
    """``tls`` with its paths taken from the folder of the YAML file that names them.

    Raises
    ------
    ConfigError
        A file that does not exist, named with its field.
    """
    base = config_path.resolve().parent
    paths = {name: base / getattr(tls, name) for name in ("cert", "key", "ca")}
    for name, path in paths.items():
        if not path.is_file():
            raise ConfigError(
                f"{config_path}: tls.{name}: {path} not found (amalgam certs makes the files)"
            )
    return TlsFiles(**{name: str(path) for name, path in paths.items()})


DEFAULT_HOSTS = ["localhost", "127.0.0.1"]


def supernode_keys() -> tuple[bytes, bytes]:
    """An EC P-256 key pair in OpenSSH form (private, public), as Flower's SuperNode
    authentication takes it: the SuperLink's operator registers the public key
    (``flwr supernode register``), the SuperNode signs with the private one."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public


def write_federation(
    folder: str | Path,
    parties: list[str],
    coordinators: list[str],
    hosts: list[str] | None = None,
    days: int = MAX_VALIDITY_DAYS,
    key_type: str = "ec",
    supernodes: list[str] = (),
    force: bool = False,
) -> list[Path]:
    """Certificates for a federation in ``folder``: ``ca.pem`` / ``ca.key`` (made once and
    reused, so that identities can be added later) and ``<identity>.pem`` / ``.key`` for each
    party, coordinator and SuperNode; a SuperNode also gets its authentication key pair
    ``<identity>.ssh`` / ``<identity>.ssh.pub``. An identity that ``folder`` holds already
    raises ``ValueError`` unless ``force``. Returns the files written."""
    folder = Path(folder)
    identities = [*parties, *coordinators, *supernodes]
    if not identities:
        raise ValueError("name at least one --party, --coordinator or --supernode")
    repeated = sorted({i for i in identities if identities.count(i) > 1})
    if repeated or "ca" in identities:
        raise ValueError(f"identities must be unique and not 'ca': {', '.join(repeated or ['ca'])}")
    _refuse_existing(folder, identities, force)
    ca, written = federation_ca(folder, days, key_type)
    for identity in identities:
        written += issue(ca, identity, hosts or DEFAULT_HOSTS, days=days, key_type=key_type).write(
            folder, identity
        )
    for identity in supernodes:
        private, public = supernode_keys()
        (folder / f"{identity}.ssh.pub").write_bytes(public + b"\n")
        write_private(folder / f"{identity}.ssh", private)
        written += [folder / f"{identity}.ssh.pub", folder / f"{identity}.ssh"]
    return written


def federation_ca(folder: Path, days: int = MAX_VALIDITY_DAYS, key_type: str = "ec"):
    """The CA of ``folder`` (``ca.pem``, ``ca.key``), made there if it has none; returns it
    and the files written."""
    ca_cert, ca_key = folder / "ca.pem", folder / "ca.key"
    if ca_cert.exists() and ca_key.exists():
        return Issued(ca_cert.read_bytes(), ca_key.read_bytes()), []
    ca = make_ca(days=days, key_type=key_type)
    return ca, list(ca.write(folder, "ca"))


def _refuse_existing(folder: Path, identities: list[str], force: bool) -> None:
    existing = [i for i in identities if (folder / f"{i}.pem").exists()]
    if existing and not force:
        raise ValueError(
            f"{folder} already holds {', '.join(existing)}: pass --force to issue again (a "
            "certificate issued before stays valid until it expires)"
        )


def write_signed(folder: str | Path, csr_pem: bytes, hosts: list[str] = (),
                 days: int = MAX_VALIDITY_DAYS, force: bool = False) -> list[Path]:  # fmt: skip
    """Sign an organization's certificate request with the CA of ``folder`` (made there if it
    has none) into ``<identity>.pem``; the organization keeps its key. Returns the files
    written."""
    folder = Path(folder)
    ca, written = federation_ca(folder, days)
    identity, cert = sign_request(ca, csr_pem, list(hosts), days)
    _refuse_existing(folder, [identity], force)
    (folder / f"{identity}.pem").write_bytes(cert)
    return [*written, folder / f"{identity}.pem"]


def write_request(folder: str | Path, identity: str, hosts: list[str] = (),
                  key_type: str = "ec") -> list[Path]:  # fmt: skip
    """``<identity>.key`` (owner-readable) and ``<identity>.csr`` in ``folder``: the request
    an organization sends to the federation's CA (``amalgam certs --csr``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_file, csr_file = folder / f"{identity}.key", folder / f"{identity}.csr"
    if key_file.exists():
        raise ValueError(f"{key_file} exists: a request keeps the key it was made with")
    key, csr = request(identity, list(hosts), key_type)
    write_private(key_file, key)
    csr_file.write_bytes(csr)
    return [key_file, csr_file]
