"""The cluster secret: where it lives, how it is made, checked and replaced.

The secret is 32 random bytes (hex in a file). Every node and the coordinator hold the same one;
it never crosses the wire: cluster/identity.py derives the cluster's CA key pair from it, and
every channel is mutual TLS with certificates that key signs.
"""

import logging
import os
import stat
import sys
from pathlib import Path

from .identity import fingerprint

SECRET_ENV = "KIMI_CLUSTER_SECRET"
HOME_ENV = "KIMI_CLUSTER_HOME"
SECRET_BYTES = 32
MIN_DISTINCT_BYTES = 16  # 32 random bytes hold ~31 distinct values; fewer than 16 is a pattern, not chance

logger = logging.getLogger("kimi_cluster.auth")


class AuthError(Exception):
    pass


_origins: dict = {}  # secret -> where this process read it (a path or $KIMI_CLUSTER_SECRET), for messages


def secret_origin(secret: bytes) -> str:
    """Where this process read `secret` from, in words a user can act on."""
    return _origins.get(secret, "a secret given in code")


def _remember(secret: bytes, origin: str) -> bytes:
    _origins[secret] = origin
    return secret


# ---------------------------------------------------------------------------
# Secret management


def config_dir() -> Path:
    if home := os.environ.get(HOME_ENV):
        return Path(home).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "kimi-cluster"
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "kimi-cluster"


def _secret_path() -> Path:
    return config_dir() / "secret"


_MAKE_ONE = "make one with `kimi-cluster secret rotate` (or `python -c 'import secrets; print(secrets.token_hex(32))'`)"


def _parse_secret(text: str, source: str) -> bytes:
    """A secret as written: hex of at least 32 bytes that look random. Passphrases are refused:
    anyone who guesses one holds the cluster's CA key, and words fall to a dictionary in seconds."""
    text = text.strip()
    if not text:
        raise AuthError(f"cluster secret from {source} is empty; {_MAKE_ONE}")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise AuthError(f"cluster secret from {source} is not hex: a passphrase is too easy to guess; "
                        f"{_MAKE_ONE}") from None
    if len(secret) < SECRET_BYTES:
        raise AuthError(f"cluster secret from {source} is too short ({len(secret)} bytes, "
                        f"{SECRET_BYTES} needed); {_MAKE_ONE}")
    if len(set(secret)) < MIN_DISTINCT_BYTES:
        raise AuthError(f"cluster secret from {source} is a pattern, not random bytes "
                        f"({len(set(secret))} distinct byte values); {_MAKE_ONE}")
    return secret


def _read_secret_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "cluster secret %s is readable by other users; run: chmod 600 '%s'",
            path,
            path,
        )
    return _remember(_parse_secret(path.read_text(), str(path)), f"the file {path}")


def _copy_instructions(path: Path) -> str:
    try:
        remote = '"$HOME/' + str(path.relative_to(Path.home())) + '"'
        remote_dir = '"$HOME/' + str(path.parent.relative_to(Path.home())) + '"'
    except ValueError:
        remote, remote_dir = f'"{path}"', f'"{path.parent}"'
    return (
        "Every Mac in the cluster needs this same secret. Copy it to each "
        "other Mac (replace othermac):\n"
        f"  ssh othermac 'umask 077 && mkdir -p {remote_dir} && "
        f"cat > {remote}' < '{path}'\n"
        f"or set {SECRET_ENV}=$(cat '{path}') in the environment there."
    )


def _write_aside(path: Path, secret: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".secret-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return tmp


def _create_secret(path: Path) -> tuple[bytes, str]:
    secret = _remember(os.urandom(SECRET_BYTES), f"the file {path} (created now)")
    # Write aside, then link into place: another process starting at the same moment either
    # wins the link (and we read its complete file) or loses it; nobody reads a half-written file.
    tmp = _write_aside(path, secret)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return _read_secret_file(path), ""
    finally:
        tmp.unlink()
    note = (
        f"Created a new cluster secret at {path} "
        f"(fingerprint {fingerprint(secret)}).\n" + _copy_instructions(path)
    )
    return secret, note


def load_secret(
    secret_file: Path | None = None, create: bool = False
) -> tuple[bytes, str]:
    """Find the cluster secret: secret_file, then $KIMI_CLUSTER_SECRET, then
    config_dir()/secret. Returns (secret, note) where note is "" unless a new
    secret was created."""
    if secret_file is not None:
        secret_file = Path(secret_file).expanduser()
        if not secret_file.is_file():
            raise AuthError(
                f"secret file {secret_file} does not exist; copy the cluster "
                f"secret there from a Mac that has it ({_secret_path()} by "
                "default) or drop --secret-file to use the default location"
            )
        return _read_secret_file(secret_file), ""

    env = os.environ.get(SECRET_ENV)
    if env is not None:
        return _remember(_parse_secret(env, f"${SECRET_ENV}"), f"${SECRET_ENV}"), ""

    path = _secret_path()
    if path.is_file():
        return _read_secret_file(path), ""
    if create:
        return _create_secret(path)
    raise AuthError(
        f"no cluster secret: {path} does not exist and {SECRET_ENV} is not set. "
        "The first Mac to run `kimi-cluster up` creates one (the others print the line that copies it); "
        f"copy it to {path} on this Mac, or set {SECRET_ENV}, or pass --secret-file."
    )



def rotate_secret(secret_file: Path | None = None) -> str:
    """Replace the secret file (secret_file or the default) with a new random secret; returns what
    to tell the user. The old one is kept beside it as `<name>.old`."""
    path = Path(secret_file).expanduser() if secret_file else _secret_path()
    secret = os.urandom(SECRET_BYTES)
    tmp = _write_aside(path, secret)
    if path.exists():
        os.replace(path, path.with_name(path.name + ".old"))
    os.replace(tmp, path)
    note = (f"Wrote a new cluster secret to {path} (fingerprint {fingerprint(secret)}); the old one is in "
            f"{path.name}.old. Nodes keep the old one until they restart, and a node with the old secret "
            "cannot talk to one with the new: restart every node after copying.\n" + _copy_instructions(path))
    if os.environ.get(SECRET_ENV) is not None:
        note += f"\nNote: ${SECRET_ENV} is set here and overrides the file; update or unset it."
    return note
