"""`kimi-cluster service install`: start `kimi-cluster up` at login on macOS (a launchd agent)."""

import argparse
import platform
import plistlib
import shlex
import shutil
import sys
from pathlib import Path

from .cli_args import fail

LABEL = "ai.kimi-cluster.up"


def agent_path(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def launchd_plist(executable: str, up_args: list, log_path: Path) -> bytes:
    """A launchd agent that runs `kimi-cluster up ARGS` at login and restarts it if it exits."""
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": [executable, "up", *up_args],
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restarted after a crash, not after `kimi-cluster stop`
        "StandardOutPath": str(log_path),
        "StandardErrorPath": str(log_path),
        "ProcessType": "Interactive",  # inference wants the performance cores
    })


def install(executable: str, up_args: list, home: Path) -> tuple:
    """Write the agent; returns (its path, the command that starts it now)."""
    path = agent_path(home)
    log_path = home / "Library" / "Logs" / "kimi-cluster.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(launchd_plist(executable, up_args, log_path))
    return path, f"launchctl bootstrap gui/$(id -u) {shlex.quote(str(path))}"


def uninstall(home: Path) -> tuple:
    path = agent_path(home)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return path, existed


def cmd_service(args) -> None:
    if platform.system() != "Darwin":
        fail("`service` writes a macOS launchd agent; on Linux run `kimi-cluster up ...` from a systemd unit")
    home = Path.home()
    if args.action == "uninstall":
        path, existed = uninstall(home)
        print(f"removed {path}; stop the running one with: launchctl bootout gui/$(id -u)/{LABEL}"
              if existed else f"no agent at {path}")
        return
    up_args = [a for a in args.up_args if a != "--"]
    executable = shutil.which("kimi-cluster") or str(Path(sys.executable).parent / "kimi-cluster")
    path, start = install(executable, up_args, home)
    print(f"wrote {path}: `kimi-cluster up {' '.join(up_args)}` at every login (log in ~/Library/Logs/kimi-cluster.log)")
    print(f"start it now: {start}")


def add_service_parser(sub) -> None:
    p = sub.add_parser("service", help="macOS: run `kimi-cluster up` at login (a launchd agent)")
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("up_args", nargs=argparse.REMAINDER, help="arguments for `up`, after --, e.g. -- --model DIR")
    p.set_defaults(func=cmd_service)
