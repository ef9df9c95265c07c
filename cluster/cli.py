"""The `kimi-cluster` command."""

import argparse
import sys

import grpc
from rich.console import Console

from mlx_kimi.checkpoint import CheckpointError

from . import client
from .auth import AuthError
from .cli_args import fail
from .client_cli import add_client_parsers
from .convert_cli import add_compare_parser, add_convert_parser
from .model_cli import add_model_parsers
from .service import add_service_parser
from .up import add_up_parsers
from .weights_cli import add_weights_parsers


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="kimi-cluster", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kimi-cluster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_parsers(sub)
    add_convert_parser(sub)
    add_compare_parser(sub)
    add_weights_parsers(sub)
    add_up_parsers(sub)
    add_service_parser(sub)
    add_client_parsers(sub)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, AuthError, ValueError) as e:
        fail(str(e))
    except client.ClientError as e:
        fail(str(e), code=1)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted", highlight=False)
        sys.exit(130)
    except grpc.RpcError as e:
        if "handshake failed" in (e.details() or "").lower():
            fail("the TLS handshake failed: that process holds another cluster's secret (or none); copy this "
                 f"cluster's secret there, or use its secret here ({e.details()})", code=1)
        fail(f"{e.code().name}: {e.details()}", code=1)
