"""`kimi-cluster service install`: start `kimi-cluster up` at login on macOS (a launchd agent)."""

import plistlib
import shlex
from pathlib import Path

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
