"""The cluster secret, and mutual TLS with the identity it makes (cluster/auth.py, cluster/identity.py)."""

import hashlib
import os
import stat
import subprocess

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cluster import auth, identity as identity_module
from cluster.auth import SECRET_ENV, AuthError, load_secret, rotate_secret
from cluster.identity import fingerprint, identity, peer_name
from cluster.wire import make_server, open_channel
from harness import KIMI

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
SAY = "/test.Echo/Say"
COUNT = "/test.Echo/Count"
UPLOAD = "/test.Echo/Upload"
CHAT = "/test.Echo/Chat"

calls = []  # every call any handler began: name of the client certificate


def _say(request, context):
    calls.append(peer_name(context))
    return b"echo:" + request


def _count(request, context):
    calls.append(peer_name(context))
    for i in range(int(request)):
        yield str(i).encode()


def _upload(request_iterator, context):
    calls.append(peer_name(context))
    return b"".join(request_iterator)


def _chat(request_iterator, context):
    calls.append(peer_name(context))
    for r in request_iterator:
        yield r.upper()


def _echo_server(secret):
    server, port = make_server("127.0.0.1", 0, secret, "echo-server")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(_say),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "Upload": grpc.stream_unary_rpc_method_handler(_upload),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
    }),))
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def address():
    server, address = _echo_server(SECRET)
    yield address
    server.stop(None)


def _call_all(channel):
    return (
        channel.unary_unary(SAY)(b"hi", timeout=10),
        list(channel.unary_stream(COUNT)(b"3", timeout=10)),
        channel.stream_unary(UPLOAD)(iter([b"a", b"b"]), timeout=10),
        list(channel.stream_stream(CHAT)(iter([b"x", b"y"]), timeout=10)),
    )


def test_cluster_members_talk_every_rpc_kind(address):
    calls.clear()
    with open_channel(address, SECRET, "member-1") as channel:
        assert _call_all(channel) == (b"echo:hi", [b"0", b"1", b"2"], b"ab", [b"X", b"Y"])
    assert calls == ["member-1"] * 4  # the server knows which member called


def test_identity_made_elsewhere_from_the_same_secret_is_trusted(address):
    """Another Mac derives the CA from the secret on its own: its certificates verify here."""
    identity_module._ca.cache_clear()
    identity_module.identity.cache_clear()
    with open_channel(address, SECRET, "other-mac") as channel:
        assert channel.unary_unary(SAY)(b"hi", timeout=10) == b"echo:hi"


@pytest.mark.parametrize("who", ["wrong secret", "no certificate"])
def test_strangers_are_refused_in_the_handshake(address, who):
    calls.clear()
    channel = open_channel(address, OTHER) if who == "wrong secret" else grpc.insecure_channel(address)
    with channel:
        for call in (lambda: channel.unary_unary(SAY)(b"hi", timeout=10),
                     lambda: list(channel.stream_stream(CHAT)(iter([b"x"]), timeout=10))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert calls == []  # no handler ever ran


def test_client_refuses_a_server_of_another_cluster():
    server, address = _echo_server(OTHER)
    calls.clear()
    try:
        with open_channel(address, SECRET) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(SAY)(b"secret prompt", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.details()
        assert calls == []
    finally:
        server.stop(None)


def test_certificate_names_the_node_and_the_cluster_host():
    me = identity(SECRET, "abc123-mac-a")
    cert = x509.load_pem_x509_certificate(me.cert_pem)
    assert cert.subject.rfc4514_string() == "CN=abc123-mac-a"
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["kimi-cluster"]
    assert SECRET.hex() not in (me.ca_pem + me.cert_pem + me.key_pem).decode()


# --- secrets --------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_CLUSTER_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv(SECRET_ENV, raising=False)
    return tmp_path / "cfg"


def test_config_dir_honours_env(home):
    assert auth.config_dir() == home


def test_create_then_reload(home):
    secret, note = load_secret(create=True)
    path = home / "secret"
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert path.read_text().strip() == secret.hex()
    assert str(path) in note
    assert "ssh" in note and SECRET_ENV in note
    assert secret.hex() not in note

    again, note2 = load_secret(create=True)
    assert again == secret
    assert note2 == ""
    assert load_secret()[0] == secret


def test_missing_without_create_errors(home):
    with pytest.raises(AuthError) as exc:
        load_secret()
    assert str(home / "secret") in str(exc.value)
    assert SECRET_ENV in str(exc.value)
    assert not (home / "secret").exists()


def test_env_wins_over_config_file(home, monkeypatch):
    file_secret, _ = load_secret(create=True)
    monkeypatch.setenv(SECRET_ENV, "  " + OTHER.hex() + "\n")
    assert load_secret()[0] == OTHER != file_secret


@pytest.mark.parametrize("text, why", [
    ("correct horse battery staple", "not hex"),       # a passphrase: a dictionary finds it
    ("kimi-cluster-test-secret-0123456789abcdef", "not hex"),
    ("00" * 32, "pattern"), ("0123" * 16, "pattern"),  # hex, but not random bytes
    ("deadbeef" * 3, "too short"),
])
def test_weak_secret_refused(home, monkeypatch, text, why):
    monkeypatch.setenv(SECRET_ENV, text)
    with pytest.raises(AuthError, match=why) as exc:
        load_secret()
    assert "kimi-cluster secret rotate" in str(exc.value)


def test_explicit_file_wins_over_env(home, tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, OTHER.hex())
    f = tmp_path / "s"
    f.write_text(SECRET.hex())
    f.chmod(0o600)
    assert load_secret(f) == (SECRET, "")


def test_explicit_missing_file_errors(home, tmp_path):
    missing = tmp_path / "nope" / "secret"
    with pytest.raises(AuthError) as exc:
        load_secret(missing, create=True)
    assert str(missing) in str(exc.value)
    assert not missing.exists()


@pytest.mark.parametrize("text", ["", "   \n", "abcd" * 4])
def test_short_or_empty_secret_refused(home, monkeypatch, text):
    monkeypatch.setenv(SECRET_ENV, text)
    with pytest.raises(AuthError) as exc:
        load_secret()
    assert "empty" in str(exc.value) or "too short" in str(exc.value)


def test_short_secret_file_refused(home, tmp_path):
    f = tmp_path / "s"
    f.write_text("deadbeef\n")
    with pytest.raises(AuthError, match="too short"):
        load_secret(f)


def test_fingerprint_is_the_full_hash_of_the_public_ca_key():
    fp = fingerprint(SECRET)
    assert fp == fingerprint(SECRET) != fingerprint(OTHER)
    ca = x509.load_pem_x509_certificate(identity(SECRET, "n").ca_pem)
    public = ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert fp == hashlib.sha256(public).hexdigest() and len(fp) == 64
    assert SECRET.hex() not in fp


def test_rotate_replaces_the_secret_and_keeps_the_old(home):
    old, _ = load_secret(create=True)
    note = rotate_secret()
    new, _ = load_secret()
    path = home / "secret"
    assert new != old and len(new) == 32 and len(set(new)) >= 16
    assert (home / "secret.old").read_text().strip() == old.hex()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fingerprint(new) in note and "restart every node" in note and new.hex() not in note


def test_secret_rotate_command(home):
    old, _ = load_secret(create=True)
    env = {**os.environ, "KIMI_CLUSTER_HOME": str(home)}
    env.pop(SECRET_ENV, None)
    done = subprocess.run([KIMI, "secret", "rotate"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    new, _ = load_secret()
    assert new != old and fingerprint(new) in done.stderr and "ssh" in done.stderr
