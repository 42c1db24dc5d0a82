"""Values from specs and configs made safe before they enter a generated script or a terminal.

A spec is input, not code: specs are shared (a lab's ``jobspecs/`` repository), so every value
orchd writes into an sbatch script or a remote start command goes through one of these:

- ``export_line``: ``export NAME='value'`` with the name checked (POSIX shell names) and the
  value quoted by ``shlex.quote``; NUL refused (no shell can carry it).
- ``sbatch_line``: ``#SBATCH --opt=value`` for names SLURM itself restricts (partition,
  account, QoS): checked against ``SLURM_NAME``, so no newline, space or ``#SBATCH`` can ride in.
- ``comment_line``: ``# text`` with control characters (newlines) replaced.
- ``printable``: a user-supplied string fit for a terminal (no escape sequences).

SLURM's names (slurm.conf(5) PartitionName, sacctmgr(1) account and QOS names) are letters,
digits, ``_``, ``-`` and ``.``; a partition option may list several, comma-separated
(sbatch(1) ``--partition``).
"""

from __future__ import annotations

import re
import shlex

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SLURM_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
SLURM_NAME_LIST = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")
CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # CSI sequences first
CONTROL_OR_NEWLINE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x1f\x7f-\x9f]")


class UnsafeValue(ValueError):
    """A value that cannot be written into a script safely (the message names it, never runs it)."""


def bash_quote(value: str) -> str:
    """``value`` as one bash word on one line: ``shlex.quote`` unless it holds control
    characters (newlines), then ANSI-C quoting ``$'...'`` (bash(1) QUOTING), so no raw newline
    ever reaches a script (an ``#SBATCH`` line hidden in a value stays inside its quotes)."""
    if not CONTROL_OR_NEWLINE.search(value):
        return shlex.quote(value)
    out = []
    for ch in value:
        o = ord(ch)
        if ch in "\\'":
            out.append("\\" + ch)
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif 0x80 <= o < 0xA0:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def check_env(name: str, value: str) -> None:
    """Raise UnsafeValue unless ``name`` is a shell variable name and ``value`` holds no NUL."""
    if not ENV_NAME.fullmatch(name):
        raise UnsafeValue(f"{name!r} is not an environment variable name (letters, digits and _, not starting "
                          "with a digit)")
    if "\x00" in value:
        raise UnsafeValue(f"{name}: a value cannot hold a NUL character")


def export_line(name: str, value: str) -> str:
    """``export NAME=<quoted value>`` on one line (``bash_quote``). Raises UnsafeValue for a name
    a shell cannot export or a value holding NUL."""
    check_env(name, value)
    return f"export {name}={bash_quote(value)}"


def sbatch_line(option: str, value: str, allow_list: bool = False) -> str:
    """``#SBATCH --option=value`` for a SLURM name (``allow_list``: comma-separated names).
    Raises UnsafeValue for anything else."""
    check_slurm_name(value, allow_list)
    return f"#SBATCH --{option}={value}"


def comment_line(text: str, limit: int = 200) -> str:
    """``# text`` on one line: control characters, newlines included, become ``?``."""
    return "# " + CONTROL_OR_NEWLINE.sub("?", text)[:limit]


def printable(text: str) -> str:
    """``text`` without terminal control sequences or control characters (newlines and tabs
    kept): what a job name or log line may show in ``orchd status``."""
    return CONTROL.sub("?", text)


def check_slurm_name(value: str | None, allow_list: bool = False) -> str | None:
    """``value`` if SLURM accepts it as a name (see module doc), else UnsafeValue (a ValueError,
    so it serves as a pydantic validator too)."""
    if value is not None and not (SLURM_NAME_LIST if allow_list else SLURM_NAME).fullmatch(value):
        raise UnsafeValue(f"{value!r} is not a SLURM name: letters, digits, '_', '-' and '.'"
                         + (" (several: comma-separated)" if allow_list else ""))
    return value
