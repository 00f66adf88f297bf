"""TLS and mutual TLS between every pair of nodes, with certificates made for the test
(tests/certs.py):

- gateway -> draft -> verify over mutual TLS streams the same tokens as over plaintext, and so
  do gateway/client.py and `aerie generate --gateway` dialling with TLS;
- every TLS port refuses plaintext; a mutual-TLS server refuses a client without a
  certificate, or with one from another CA; a client that does not trust the server's CA
  fails; a certificate for another name needs --tls-server-name;
- the plaintext health port answers health checks and nothing else;
- a service process configured by AERIE_TLS_* variables serves mutual TLS;
- wrong settings end a service's start with one line and exit status 2, before any model loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aerie.errors import InputError
from aerie_rpc.config import from_args, parser_for
from aerie_rpc.server import ServiceHost, channel, wait_for_serving
from aerie_rpc.tls import TlsSettings, load_tls
from draft_service.config import DraftConfig
from gateway import client
from tests.certs import OTHER_NAME, Pki, make_pki
from tests.services_support import (
    ROOT,
    free_port,
    spawn,
    start_drafter,
    start_gateway,
    start_verifier,
    wait_all,
)

PROMPT = [3, 14, 15, 9, 26, 5]
MAX_NEW = 40


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def node_tls(pki: Pki) -> dict[str, str]:
    """The settings of a node in a mutual-TLS deployment: one certificate to serve with and to
    show as a client, the CA to require of clients and to trust in servers."""
    return {"tls_cert": str(pki.node.cert), "tls_key": str(pki.node.key), "tls_client_ca": str(pki.ca),
            "tls_ca": str(pki.ca)}


def client_tls(pki: Pki, **over) -> TlsSettings:
    fields = {"tls_ca": str(pki.ca), "tls_cert": str(pki.client.cert), "tls_key": str(pki.client.key), **over}
    return load_tls(SimpleNamespace(**fields))


class Chain:
    """Verify, draft and gateway in this process; over mutual TLS when `pki` is given."""

    def __init__(self, tiny: tuple[Path, Path], pki: Pki | None):
        model_dir, head_dir = tiny
        server = {k: v for k, v in node_tls(pki).items() if k != "tls_ca"} if pki else {}
        node = node_tls(pki) if pki else {}
        self.vhost, _ = start_verifier(model_dir, health_listen="127.0.0.1:0", **server)
        self.dhost, _ = start_drafter(model_dir, head_dir, [self.vhost.address], **node)
        self.ghost, _ = start_gateway([self.dhost.address], model_dir, **node)
        self.hosts = {"verify": self.vhost, "draft": self.dhost, "gateway": self.ghost}

    def stop(self) -> None:
        for host in (self.ghost, self.dhost, self.vhost):
            host.stop(0.5)


@pytest.fixture(scope="module")
def tls_chain(tiny, pki):
    chain = Chain(tiny, pki)
    yield chain
    chain.stop()


@pytest.fixture(scope="module")
def plain_chain(tiny):
    chain = Chain(tiny, None)
    yield chain
    chain.stop()


def health(address: str, tls: TlsSettings | None) -> int:
    with channel(address, tls) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def refused(address: str, tls: TlsSettings | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        health(address, tls)
    return err.value.code()


def generate(address: str, tls: TlsSettings | None, temperature: float) -> dict:
    req = client.request(prompt_ids=PROMPT, max_new_tokens=MAX_NEW, temperature=temperature, seed=11)
    return client.collect(client.stream(address, req, timeout_s=60, tls=tls))


# --- the chain over TLS -------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chain_over_mutual_tls_streams_what_plaintext_streams(tls_chain, plain_chain, pki, temperature):
    secure = generate(tls_chain.ghost.address, client_tls(pki), temperature)
    plain = generate(plain_chain.ghost.address, None, temperature)
    assert secure["token_ids"] == secure["streamed_ids"] == plain["token_ids"]
    assert len(plain["token_ids"]) == MAX_NEW and secure["finish_reason"] == "length"
    # It went through the TLS drafter and verifier, speculating (more than a token a round).
    assert (secure["drafter"], secure["verifier"]) == (tls_chain.dhost.address, tls_chain.vhost.address)
    assert secure["rounds"] < MAX_NEW and secure["resumes"] == 0


def test_every_tls_port_refuses_plaintext(tls_chain):
    for name, host in tls_chain.hosts.items():
        assert refused(host.address, None) == grpc.StatusCode.UNAVAILABLE, name


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(tls_chain, pki):
    no_cert = load_tls(SimpleNamespace(tls_ca=str(pki.ca)))
    foreign = client_tls(pki, tls_cert=str(pki.other_client.cert), tls_key=str(pki.other_client.key))
    for name, host in tls_chain.hosts.items():
        assert health(host.address, client_tls(pki)) == health_pb2.HealthCheckResponse.SERVING, name
        assert refused(host.address, no_cert) == grpc.StatusCode.UNAVAILABLE, name
        assert refused(host.address, foreign) == grpc.StatusCode.UNAVAILABLE, name


def test_a_client_that_does_not_trust_the_ca_fails(tls_chain, pki):
    distrustful = client_tls(pki, tls_ca=str(pki.other_ca))
    for name, host in tls_chain.hosts.items():
        assert refused(host.address, distrustful) == grpc.StatusCode.UNAVAILABLE, name


def test_server_name_override(pki):
    """A certificate whose name is not the dialled host is refused, unless the client is told
    the name to expect."""
    server = load_tls(SimpleNamespace(tls_cert=str(pki.named.cert), tls_key=str(pki.named.key)))
    host = ServiceHost("127.0.0.1:0", lambda s: None, [], tls=server)
    try:
        assert refused(host.address, load_tls(SimpleNamespace(tls_ca=str(pki.ca)))) == grpc.StatusCode.UNAVAILABLE
        named = load_tls(SimpleNamespace(tls_ca=str(pki.ca), tls_server_name=OTHER_NAME))
        assert health(host.address, named) == health_pb2.HealthCheckResponse.SERVING
    finally:
        host.stop(0)


def test_plaintext_health_port_answers_health_checks_only(tls_chain):
    address = tls_chain.vhost.health_address
    assert address and address != tls_chain.vhost.address
    assert health(address, None) == health_pb2.HealthCheckResponse.SERVING
    with channel(address) as ch:
        reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        with pytest.raises(grpc.RpcError) as err:
            list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(reqs, timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_cli_generate_over_tls(tls_chain, plain_chain, pki):
    aerie = str(Path(sys.executable).with_name("aerie"))
    common = ["generate", "--prompt", "w3 w14 w15 w9", "--no-chat", "--max-new-tokens", "16", "--json"]
    certs = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]

    def run(address: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([aerie, *common, "--gateway", address, *extra], capture_output=True, text=True,
                              check=False, timeout=120, cwd=ROOT)

    secure, plain = run(tls_chain.ghost.address, *certs), run(plain_chain.ghost.address)
    assert secure.returncode == 0 and plain.returncode == 0, secure.stderr + plain.stderr
    assert json.loads(secure.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert len(json.loads(secure.stdout)["token_ids"]) == 16
    refused_run = run(tls_chain.ghost.address)
    errors = [line for line in refused_run.stderr.splitlines() if line.startswith("aerie: error:")]
    assert refused_run.returncode == 2 and len(errors) == 1 and "UNAVAILABLE" in errors[0], refused_run.stderr


def test_a_service_process_configured_by_environment_serves_mutual_tls(tiny, pki, tmp_path):
    """The deployment's way: AERIE_TLS_* variables, a process of its own."""
    model_dir, _ = tiny
    address = f"127.0.0.1:{free_port()}"
    env = {"AERIE_TLS_CERT": str(pki.node.cert), "AERIE_TLS_KEY": str(pki.node.key),
           "AERIE_TLS_CLIENT_CA": str(pki.ca)}
    proc = spawn("verify_service", ["--listen", address, "--model", str(model_dir)], env=env,
                 log=tmp_path / "verify.log")
    try:
        wait_all([address], [proc], tls=client_tls(pki))
        assert refused(address, None) == grpc.StatusCode.UNAVAILABLE
        assert refused(address, load_tls(SimpleNamespace(tls_ca=str(pki.ca)))) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(TimeoutError):
            wait_for_serving(address, timeout_s=1.0)  # plaintext health checks never succeed
        assert "over TLS" in (tmp_path / "verify.log").read_text()
    finally:
        proc.kill()
        proc.wait(10)


# --- settings -------------------------------------------------------------------------------


def test_settings_come_from_flags_and_environment(pki):
    parser = parser_for(DraftConfig, "draft", "")
    args = parser.parse_args(["--verifier", "v:1", "--tls-cert", str(pki.node.cert), "--tls-key", str(pki.node.key)])
    config = from_args(DraftConfig, args, environ={"AERIE_TLS_CA": str(pki.ca), "AERIE_TLS_CERT": "/ignored",
                                                   "AERIE_TLS_SERVER_NAME": OTHER_NAME})
    assert (config.tls_cert, config.tls_ca, config.tls_server_name) == (str(pki.node.cert), str(pki.ca), OTHER_NAME)
    tls = load_tls(config)
    assert tls.serving and tls.dialing and tls.client_ca is None
    assert tls.cert == pki.node.cert.read_bytes() and tls.ca == pki.ca.read_bytes()
    assert tls.channel_options() == [("grpc.ssl_target_name_override", OTHER_NAME)]
    plain = load_tls(from_args(DraftConfig, parser.parse_args(["--verifier", "v:1"]), environ={}))
    assert plain == TlsSettings() and not plain.serving and not plain.dialing


def _encrypted_key(pki: Pki, where: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.node.key.read_bytes(), password=None)
    path = where / "encrypted.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return str(path)


BAD_SETTINGS = [
    ("missing-cert", lambda p, t: {"tls_cert": str(t / "nope.crt"), "tls_key": str(p.node.key)},
     "--tls-cert", "cannot read"),
    ("cert-without-key", lambda p, t: {"tls_cert": str(p.node.cert)}, "--tls-key", "together"),
    ("key-of-another-cert", lambda p, t: {"tls_cert": str(p.node.cert), "tls_key": str(p.client.key)},
     "--tls-key", "not a PEM certificate and its private key"),
    ("encrypted-key", lambda p, t: {"tls_cert": str(p.node.cert), "tls_key": _encrypted_key(p, t)},
     "--tls-key", "encrypted"),
    ("client-ca-without-cert", lambda p, t: {"tls_client_ca": str(p.ca)}, "--tls-client-ca", "needs --tls-cert"),
    ("ca-not-a-certificate", lambda p, t: {"tls_ca": str(p.node.key)}, "--tls-ca", "no PEM CA certificate"),
    ("missing-ca", lambda p, t: {"tls_ca": str(t / "nope-ca.crt")}, "--tls-ca", "cannot read"),
    ("server-name-without-ca", lambda p, t: {"tls_server_name": "x"}, "--tls-server-name", "needs --tls-ca"),
]


@pytest.mark.parametrize("name,fields,flag,words", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_settings_name_the_flag_and_the_problem(pki, tmp_path, name, fields, flag, words):
    with pytest.raises(InputError) as err:
        load_tls(SimpleNamespace(**fields(pki, tmp_path)))
    assert flag in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("how", ["python -m verify_service", "aerie serve gateway"])
def test_a_bad_certificate_path_ends_the_start_with_one_line(tmp_path, how):
    """Checked before the model loads: the model path given is missing too, yet the error is
    about the certificate."""
    missing = str(tmp_path / "missing.crt")
    env = {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    if how.startswith("python"):
        cmd = [sys.executable, "-m", "verify_service", "--listen", "127.0.0.1:0", "--model", "/no/such/model",
               "--tls-cert", missing, "--tls-key", missing]
    else:
        cmd = [str(Path(sys.executable).with_name("aerie")), "serve", "gateway", "--listen", "127.0.0.1:0",
               "--draft", "127.0.0.1:1", "--model", "/no/such/model"]
        env.update(AERIE_TLS_CERT=missing, AERIE_TLS_KEY=missing)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aerie: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and f"--tls-cert {missing}: cannot read it" in lines[0], proc.stderr
