"""The cluster's identity: a CA key pair derived from the cluster secret, and the certificates it signs.

Every holder of the secret derives the same P-256 CA key, so the secret file stays the one thing a
user copies to each Mac. Each process makes its own key pair and a certificate naming its node id,
signed by that CA key; every gRPC channel is mutual TLS against the CA certificate, so a peer
without the secret is refused in the handshake, before any message is read. Only the SHA-256 of
the CA public key (the fingerprint) is ever announced.

Every member derives the same CA key, so any member can mint a certificate for any name: a node's
certificate names its node id, and a removed node id is refused (Revocations), but that holds
against the removed node's own processes, not against a member that mints itself a new identity
(README, "Removing a node").
"""

import datetime
import functools
import hashlib
import json
import threading
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Every certificate's DNS name. Nodes are addressed by IP, so channels check the server's
# certificate against this name (gRPC's ssl_target_name_override) instead of the address.
CLUSTER_HOST = "kimi-cluster"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_CA_VALID = (datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC), datetime.datetime(2120, 1, 1, tzinfo=datetime.UTC))
_LEAF_DAYS = 3650


@dataclass(frozen=True)
class Identity:
    """What this process presents and trusts: PEM bytes as gRPC's credentials take them."""

    name: str            # the node id (or client name) the certificate carries
    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes
    fingerprint: str     # SHA-256 of the CA public key: public, names the cluster


def _ca_key(secret: bytes) -> ec.EllipticCurvePrivateKey:
    seed = HKDF(hashes.SHA256(), length=48, salt=None, info=b"kimi-cluster CA key v1").derive(secret)
    return ec.derive_private_key(int.from_bytes(seed) % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def _public_der(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@functools.lru_cache(maxsize=8)
def _ca(secret: bytes) -> tuple:
    """(CA key, CA certificate, fingerprint). The certificate's fields are fixed, so every holder
    of the secret makes one with the same subject and key: each verifies the others' leaves."""
    key = _ca_key(secret)
    fp = hashlib.sha256(_public_der(key)).hexdigest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kimi-cluster CA {fp[:16]}")])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(int(fp[:30], 16)).not_valid_before(_CA_VALID[0]).not_valid_after(_CA_VALID[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert, fp


def fingerprint(secret: bytes) -> str:
    """The cluster's public name: SHA-256 (hex, full length) of the CA public key the secret makes."""
    return _ca(secret)[2]


@functools.lru_cache(maxsize=32)
def identity(secret: bytes, name: str) -> Identity:
    """A fresh key pair and a certificate for `name` signed by the cluster CA (one per process and name)."""
    ca_key, ca_cert, fp = _ca(secret)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate clocks a day apart
        .not_valid_after(now + datetime.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(CLUSTER_HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Identity(
        name=name, ca_pem=ca_cert.public_bytes(pem), cert_pem=cert.public_bytes(pem), fingerprint=fp,
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def server_credentials(me: Identity) -> grpc.ServerCredentials:
    """TLS that presents `me` and accepts only clients with a certificate of this cluster."""
    return grpc.ssl_server_credentials([(me.key_pem, me.cert_pem)], root_certificates=me.ca_pem,
                                       require_client_auth=True)


def channel_credentials(me: Identity) -> grpc.ChannelCredentials:
    """TLS that presents `me` and accepts only servers with a certificate of this cluster."""
    return grpc.ssl_channel_credentials(root_certificates=me.ca_pem, private_key=me.key_pem,
                                        certificate_chain=me.cert_pem)


def peer_name(context: grpc.ServicerContext) -> str:
    """The certificate name (node id) of the peer of a server-side call."""
    names = context.auth_context().get("x509_common_name") or [b""]
    return names[0].decode(errors="replace")


class Revocations:
    """The node ids this cluster refuses (`kimi-cluster node remove`), kept in a JSON file
    ({node id: name}) so that they survive a restart. Every server of this machine checks the
    caller's certificate against it on every call; the file is read again when it changes."""

    def __init__(self, path):
        self.path = path
        self._stamp, self._revoked = None, {}
        self._lock = threading.Lock()

    def _current(self) -> dict:
        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            return {}
        if stamp != self._stamp:
            try:
                revoked = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return self._revoked  # being replaced: the last one read stands
            self._stamp, self._revoked = stamp, revoked if isinstance(revoked, dict) else {}
        return self._revoked

    def name_of(self, node_id: str) -> str | None:
        """The name `node_id` had when it was removed, or None when it is not removed."""
        return self._current().get(node_id)

    def add(self, node_id: str, name: str):
        with self._lock:
            revoked = {**self._current(), node_id: name}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(revoked, indent=1))
            temporary.replace(self.path)
