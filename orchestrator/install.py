"""Keep orchd ticking without a terminal: a crontab line running ``orchd poll`` every minute, or
a systemd *user* unit running ``orchd daemon``. Both name orchd's state (``ORCHD_HOME``, and
``ORCHD_CONFIG`` when set) and never a secret: API keys, an SMTP password or a database URL
with a password go in the environment file ``$XDG_CONFIG_HOME/orchd/orchd.env`` (``KEY=value``
lines, chmod 600), which both read when it exists.

Sources: crontab(5) (``%`` is special in a command, so none is written; ``crontab -l`` /
``crontab -`` read and replace the user's table); systemd.service(5), systemd.exec(5)
(``EnvironmentFile=-`` tolerates a missing file), systemd.unit(5) (user units live in
``$XDG_CONFIG_HOME/systemd/user``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.errors import ConfigError

CRON_TAG = "# orchd poll (orchd install-cron)"
UNIT = "orchd.service"


def orchd_command() -> list[str]:
    """How to run this orchd: its entry point beside the interpreter, else ``python -m``."""
    exe = Path(sys.executable).parent / "orchd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "orchestrator.cli"]


def env_file(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "orchd" / "orchd.env"


def _state_env(settings: Settings, environ: dict[str, str]) -> dict[str, str]:
    out = {"ORCHD_HOME": str(settings.home)}
    if environ.get("ORCHD_CONFIG"):
        out["ORCHD_CONFIG"] = str(Path(environ["ORCHD_CONFIG"]).expanduser().resolve())
    out["PATH"] = environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")  # sbatch, ssh, rsync as the shell finds them
    return out


def cron_line(settings: Settings, environ: dict[str, str] | None = None) -> str:
    """The crontab line: every minute, ``orchd poll`` with the environment file read first,
    its output appended to ``$ORCHD_HOME/poll.log``."""
    env = os.environ if environ is None else environ
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in _state_env(settings, env).items())
    ef = shlex.quote(str(env_file(env)))
    inner = f"set -a; [ -r {ef} ] && . {ef}; set +a; exec {shlex.join(orchd_command())} -q poll"
    line = (f"* * * * * {assigns} /bin/sh -c {shlex.quote(inner)} >> {shlex.quote(str(settings.home / 'poll.log'))}"
            f" 2>&1 {CRON_TAG}")
    if "%" in line:
        raise ConfigError("a path holds '%', which crontab(5) turns into a newline: move ORCHD_HOME or orchd")
    return line


def _crontab() -> str:
    path = shutil.which("crontab")
    if path is None:
        raise ConfigError("crontab is not installed (Debian/Ubuntu: apt install cron); or use "
                          "`orchd install-service` (systemd) or run `orchd daemon`")
    return path


def install_cron(settings: Settings, uninstall: bool = False) -> str:
    """Add (or with ``uninstall`` remove) orchd's line in the user's crontab; an existing orchd
    line is replaced, other lines are kept. Returns what was done. Raises ConfigError."""
    crontab = _crontab()
    got = subprocess.run([crontab, "-l"], capture_output=True, text=True)
    if got.returncode != 0 and "no crontab" not in got.stderr.lower():
        # anything but "no crontab for <user>": writing now could replace a table we could not read
        raise ConfigError(f"crontab -l failed ({got.stderr.strip() or f'exit {got.returncode}'}); "
                          "your crontab was not changed")
    current = got.stdout if got.returncode == 0 else ""
    kept = [ln for ln in current.splitlines() if not ln.endswith(CRON_TAG)]
    line = None if uninstall else cron_line(settings)
    table = "\n".join(kept + ([line] if line else [])) + "\n"
    put = subprocess.run([crontab, "-"], input=table, capture_output=True, text=True)
    if put.returncode != 0:
        raise ConfigError(f"crontab refused the table: {put.stderr.strip()}")
    if uninstall:
        return "removed orchd's line from your crontab" if len(kept) < len(current.splitlines()) else \
            "your crontab had no orchd line"
    return f"added to your crontab (crontab -l shows it):\n{line}"


def unit_text(settings: Settings, environ: dict[str, str] | None = None) -> str:
    """The systemd user unit running ``orchd daemon``; SIGTERM stops it after the current tick."""
    env = os.environ if environ is None else environ
    lines = ["[Unit]", "Description=orchd: watches ML training jobs (orchd daemon)",
             "After=network-online.target", "", "[Service]", "Type=simple"]
    lines += [f'Environment="{_unit_escape(f"{k}={v}")}"' for k, v in _state_env(settings, env).items()]
    lines += [f"EnvironmentFile=-{_unit_escape(str(env_file(env)))}",
              f"ExecStart={_unit_escape(shlex.join(orchd_command()))} daemon",
              "Restart=on-failure", "RestartSec=10", "KillSignal=SIGTERM", "TimeoutStopSec=300", "",
              "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


def _unit_escape(value: str) -> str:
    """A value for a unit file: ``%`` is a specifier (systemd.unit(5)), backslash and quote are
    escapes in quoted values (systemd.exec(5))."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def unit_path(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "systemd" / "user" / UNIT


def install_service(settings: Settings, uninstall: bool = False) -> str:
    """Write (or remove) the user unit and ask ``systemctl --user`` to enable and start it (or
    stop and disable it). Without a user systemd (containers, some HPC login nodes) the unit is
    still written and the commands to run are given. Returns what was done."""
    path = unit_path()
    systemctl = shutil.which("systemctl")

    def ask(*args: str) -> str | None:  # None: done; else why not
        if systemctl is None:
            return "systemctl is not installed"
        r = subprocess.run([systemctl, "--user", *args], capture_output=True, text=True)
        return None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")

    if uninstall:
        why = ask("disable", "--now", UNIT) if path.exists() else None
        existed = path.exists()
        path.unlink(missing_ok=True)
        ask("daemon-reload")
        done = f"removed {path}" if existed else f"{path} did not exist"
        return done + (f" (systemctl --user disable said: {why})" if why else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit_text(settings))
    why = ask("daemon-reload") or ask("enable", "--now", UNIT)
    if why is None:
        return f"wrote {path}; enabled and started (systemctl --user status orchd; journalctl --user -u orchd)"
    return (f"wrote {path}; could not start it here ({why}). Where a user systemd runs:\n"
            f"  systemctl --user daemon-reload && systemctl --user enable --now orchd\n"
            f"  loginctl enable-linger $USER   # keep it running after you log out")
