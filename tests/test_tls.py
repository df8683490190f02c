"""Identities over mutual TLS: the six ways a caller without a valid identity is kept out
(each before the party's handler runs), the identity taken from the certificate and never
from a header, bearer tokens, and `amalgam certs`."""

from __future__ import annotations

import datetime
import stat

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from parties import INPUT_SHAPE, tiny_handler

from amalgam.party.audit import read_records
from amalgam.party.service import Authenticator, create_server
from amalgam.protocol import AUTHORIZATION_METADATA_KEY, CALLER_METADATA_KEY
from amalgam.protocol._generated import party_pb2, party_pb2_grpc
from amalgam.protocol.codec import tensor_to_proto
from amalgam.protocol.schemas import Policy, PredictPolicy, TlsFiles
from amalgam.protocol.tls import (
    Issued,
    channel_credentials,
    identity_of,
    issue,
    make_ca,
    server_credentials,
    token_digest,
    write_federation,
)
from amalgam.server.cli import main
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.parties import serving

pytestmark = pytest.mark.integration

NOW = datetime.datetime.now(datetime.UTC)
HOSTS = ["localhost", "127.0.0.1"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A federation (CA, party acme, coordinator, mallory) plus certificates that must fail:
    expired, not yet valid, and one from a foreign CA."""
    folder = tmp_path_factory.mktemp("certs")
    write_federation(folder, ["acme"], ["coordinator", "mallory"], HOSTS)
    federation = Issued((folder / "ca.pem").read_bytes(), (folder / "ca.key").read_bytes())
    windows = {
        "expired": (NOW - datetime.timedelta(days=3), 1),
        "not-yet-valid": (NOW + datetime.timedelta(days=2), 365),
    }
    for stem, (start, days) in windows.items():
        issue(federation, "coordinator", HOSTS, days=days, not_before=start).write(folder, stem)
    issue(make_ca(), "coordinator", HOSTS).write(folder, "foreign")
    return folder


def _files(folder, stem: str) -> TlsFiles:
    return TlsFiles(
        cert=str(folder / f"{stem}.pem"), key=str(folder / f"{stem}.key"), ca=str(folder / "ca.pem")
    )


class CountingHandler:
    """Counts how often the handler's Predict runs."""

    def __init__(self, handler) -> None:
        self.calls = 0
        original = handler.predict

        def predict(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        handler.predict = predict


@pytest.fixture
def tls_party(certs, tmp_path):
    policy = Policy(
        predict=PredictPolicy(output="probs"), max_batch=16, callers={"coordinator": ["predict"]}
    )
    handler = tiny_handler(tmp_path, policy)
    counter = CountingHandler(handler)
    server = create_server(
        handler, "127.0.0.1:0", credentials=server_credentials(_files(certs, "acme"))
    )
    server.start()
    try:
        yield handler, counter, f"127.0.0.1:{server.port}"
    finally:
        server.stop(None)


def _predict(channel, metadata=()):
    stub = party_pb2_grpc.PartyServiceStub(channel)
    request = party_pb2.PredictRequest(
        request_id="r", inputs=tensor_to_proto(torch.rand(2, *INPUT_SHAPE))
    )
    return stub.Predict(request, timeout=5, metadata=metadata)


def _secure(address, credentials):
    return grpc.secure_channel(address, credentials)


def _client(certs, stem: str, ca: str = "ca.pem") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / ca).read_bytes(),
        private_key=(certs / f"{stem}.key").read_bytes(),
        certificate_chain=(certs / f"{stem}.pem").read_bytes(),
    )


def test_the_coordinator_certificate_is_the_identity_whatever_the_header_says(tls_party, certs):
    handler, counter, address = tls_party
    with _secure(address, channel_credentials(_files(certs, "coordinator"))) as channel:
        reply = _predict(channel, metadata=((CALLER_METADATA_KEY, "admin"),))
    assert list(reply.outputs.shape) == [2, 3]
    assert counter.calls == 1
    assert read_records(handler.audit.path)[-1]["caller"] == "coordinator"


NEGATIVE_CASES = {
    "plaintext": lambda certs: None,
    "no-client-certificate": lambda certs: grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes()
    ),
    "foreign-ca": lambda certs: _client(certs, "foreign"),
    "expired": lambda certs: _client(certs, "expired"),
    "not-yet-valid": lambda certs: _client(certs, "not-yet-valid"),
}


@pytest.mark.parametrize("case", list(NEGATIVE_CASES))
def test_a_caller_without_a_valid_certificate_never_reaches_the_handler(tls_party, certs, case):
    handler, counter, address = tls_party
    credentials = NEGATIVE_CASES[case](certs)
    channel = (
        grpc.insecure_channel(address) if credentials is None else _secure(address, credentials)
    )
    with channel, pytest.raises(grpc.RpcError) as raised:
        _predict(channel)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
    assert counter.calls == 0
    assert read_records(handler.audit.path) == []  # nothing reached the application


def test_a_certificate_of_another_identity_is_denied_before_the_handler(tls_party, certs):
    handler, counter, address = tls_party
    with (
        _secure(address, _client(certs, "mallory")) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        _predict(channel, metadata=((CALLER_METADATA_KEY, "coordinator"),))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'mallory' is not admitted" in raised.value.details()
    assert counter.calls == 0
    (record,) = read_records(handler.audit.path)
    assert (record["caller"], record["decision"]) == ("mallory", "denied")


def test_the_coordinator_refuses_a_party_whose_certificate_its_ca_did_not_sign(certs, tmp_path):
    handler = tiny_handler(
        tmp_path, Policy(predict=PredictPolicy(), callers={"coordinator": ["predict"]})
    )
    foreign = TlsFiles(
        cert=str(certs / "foreign.pem"), key=str(certs / "foreign.key"), ca=str(certs / "ca.pem")
    )
    server = create_server(handler, "127.0.0.1:0", credentials=server_credentials(foreign))
    server.start()
    try:
        credentials = channel_credentials(_files(certs, "coordinator"))
        with RemoteTeacher(
            "acme", f"127.0.0.1:{server.port}", credentials=credentials, retries=0, deadline_s=5
        ) as t:
            with pytest.raises(ConnectionError, match="unreachable"):
                t.predict(torch.rand(2, *INPUT_SHAPE))
    finally:
        server.stop(None)
    assert read_records(handler.audit.path) == []


# --- bearer tokens ----------------------------------------------------------------------------


@pytest.fixture
def token_party(tmp_path):
    handler = tiny_handler(tmp_path)
    authenticator = Authenticator(tokens={"coordinator": token_digest("s3cret")})
    server = create_server(handler, "127.0.0.1:0", authenticator=authenticator)
    server.start()
    try:
        yield handler, f"127.0.0.1:{server.port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    ("caller", "authorization", "ok"),
    [
        ("coordinator", "Bearer s3cret", True),
        ("coordinator", "Bearer s3cre", False),
        ("coordinator", None, False),
        ("coordinator", "Basic s3cret", False),
        ("mallory", "Bearer s3cret", False),  # the token belongs to another identity
    ],
    ids=["right", "wrong", "missing", "other-scheme", "other-identity"],
)
def test_bearer_tokens(token_party, caller, authorization, ok):
    handler, address = token_party
    metadata = ((CALLER_METADATA_KEY, caller),)
    if authorization is not None:
        metadata += ((AUTHORIZATION_METADATA_KEY, authorization),)
    with grpc.insecure_channel(address) as channel:
        if ok:
            assert list(_predict(channel, metadata).outputs.shape) == [2, 3]
            assert read_records(handler.audit.path)[-1]["caller"] == caller
            return
        with pytest.raises(grpc.RpcError) as raised:
            _predict(channel, metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert read_records(handler.audit.path)[-1]["decision"] == "unauthenticated"


def test_remote_teacher_sends_its_token(token_party):
    _, address = token_party
    with RemoteTeacher("acme", address, token="s3cret") as teacher:
        assert teacher.predict(torch.rand(3, *INPUT_SHAPE)).shape == (3, 3)


# --- amalgam certs ----------------------------------------------------------------------------


def test_amalgam_certs_makes_a_federation(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--party", "acme", "--coordinator", "hub",
                 "--host", "party.example.org", "--host", "10.1.2.3"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "acme.key", "acme.pem", "ca.key", "ca.pem", "hub.key", "hub.pem"
    ]  # fmt: skip
    for key in ("ca.key", "acme.key", "hub.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((out / "acme.pem").read_bytes())
    assert identity_of((out / "acme.pem").read_bytes()) == "acme"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["party.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(days=365)
    ca_pem = (out / "ca.pem").read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert cert.issuer == ca.subject
    # a later call adds an identity under the same CA
    assert main(["certs", "--out", str(out), "--party", "globex"]) == 0
    assert (out / "ca.pem").read_bytes() == ca_pem
    assert x509.load_pem_x509_certificate((out / "globex.pem").read_bytes()).issuer == ca.subject


def test_an_organization_keeps_its_key_and_the_ca_signs_its_request(tmp_path, capsys):
    federation, home = tmp_path / "federation", tmp_path / "acme-home"
    assert main(["certs", "--out", str(federation), "--coordinator", "coordinator"]) == 0
    assert main(["certs", "--out", str(home), "--request", "acme", "--host", "acme.example"]) == 0
    assert stat.S_IMODE((home / "acme.key").stat().st_mode) == 0o600
    csr = home / "acme.csr"
    assert main(["certs", "--out", str(federation), "--csr", str(csr), "--host", "127.0.0.1"]) == 0
    assert not (federation / "acme.key").exists()  # the key never left home
    cert = x509.load_pem_x509_certificate((federation / "acme.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["acme.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # the organization's key and the CA's certificate serve mutual TLS together
    acme = TlsFiles(cert=str(federation / "acme.pem"), key=str(home / "acme.key"),
                    ca=str(federation / "ca.pem"))  # fmt: skip
    policy = Policy(predict=PredictPolicy(output="probs"), callers={"coordinator": ["predict"]})
    with serving(tiny_handler(tmp_path, policy), server_credentials(acme)) as address:
        coordinator = channel_credentials(_files(federation, "coordinator"))
        with RemoteTeacher("acme", address, credentials=coordinator) as teacher:
            assert teacher.info.name == "acme"
    capsys.readouterr()
    # an identity the folder holds is issued again only with --force
    assert main(["certs", "--out", str(federation), "--csr", str(csr)]) == 2
    assert "already holds acme: pass --force" in capsys.readouterr().err
    assert main(["certs", "--out", str(federation), "--csr", str(csr), "--force"]) == 0
    assert main(["certs", "--out", str(federation), "--coordinator", "coordinator"]) == 2
    # a request altered on the way is refused
    der = bytearray(x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(Encoding.DER))
    der[-1] ^= 0xFF  # inside the signature
    altered = tmp_path / "altered.csr"
    altered.write_bytes(x509.load_der_x509_csr(bytes(der)).public_bytes(Encoding.PEM))
    assert main(["certs", "--out", str(federation), "--csr", str(altered), "--force"]) == 2
    assert "its signature does not verify" in capsys.readouterr().err


def test_amalgam_certs_rsa_keys_are_3072_bits(tmp_path):
    assert main(["certs", "--out", str(tmp_path), "--party", "acme", "--key-type", "rsa"]) == 0
    key = x509.load_pem_x509_certificate((tmp_path / "acme.pem").read_bytes()).public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--party", "acme", "--days", "400"], "days=400: a certificate is valid for 1 to 365"),
        (["--party", "a/b"], "identity 'a/b'"),
        ([], "give identities (--party, --coordinator, --supernode), or --csr FILE, or"),
        (["--party", "acme", "--coordinator", "acme"], "must be unique"),
    ],
)
def test_amalgam_certs_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["certs", "--out", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_party_check_reports_health_and_grants_or_the_refusal(tls_party, certs, capsys):
    _, _, address = tls_party

    def check(stem):
        files = ["--cert", str(certs / f"{stem}.pem"), "--key", str(certs / f"{stem}.key")]
        return main(["party", "check", "--address", address, *files, "--ca", str(certs / "ca.pem")])

    assert check("coordinator") == 0
    out = capsys.readouterr().out
    assert f"party acme at {address}: SERVING" in out and "policy grants predict" in out
    assert check("mallory") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caller 'mallory' is not admitted" in err[0]
