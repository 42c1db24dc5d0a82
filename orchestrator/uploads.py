"""What of a job's workdir is uploaded to a rented instance: a stranger's machine.

``plan(spec, state_dir)`` walks the workdir (or its ``sync`` paths) and sorts every file into
sent or kept home, with the reason. Kept home whatever the spec says:

- secret-bearing paths (``SECRET_PATTERNS``: SSH keys and directories, ``.env*``, ``*.pem``,
  ``*.key``, ``id_*``, ``.netrc``, cloud and docker credentials, ``.git-credentials``, ...);
- orchd's own state directory (``$ORCHD_HOME``: database, config, host keys, logs), wherever
  it is;
- the spec's ``sync_exclude`` patterns;
- files over ``MAX_FILE_BYTES`` unless a ``sync`` entry names the file itself;
- symlinks that lead outside the workdir (``tar`` would send their target).

``orchd submit --dry-run`` prints the plan; the upload sends exactly ``plan.files``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from orchestrator.spec import JobSpec

SECRET_PATTERNS = (".ssh", ".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "id_*", ".netrc",
                   ".aws", ".azure", ".gcloud", ".config/gcloud", ".docker", ".kube", ".git-credentials",
                   ".pgpass", ".pypirc", "credentials", "credentials.*", "*.kdbx", ".vast_api_key", ".runpod")
MAX_FILE_BYTES = 200 << 20  # bigger files (datasets, old checkpoints) only when sync names them


@dataclass
class UploadPlan:
    """``files``: (path relative to workdir, bytes) to send; ``kept``: (path, why) kept home."""

    root: Path
    files: list[tuple[str, int]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)


def _secret(parts: tuple[str, ...]) -> str | None:
    for i, part in enumerate(parts):
        for pat in SECRET_PATTERNS:
            if "/" in pat:
                if "/".join(parts[i:i + pat.count("/") + 1]) == pat:
                    return pat
            elif fnmatch(part, pat):
                return pat
    return None


def plan(spec: JobSpec, state_dir: Path, max_file_bytes: int = MAX_FILE_BYTES) -> UploadPlan:
    """Sort the files of ``spec.workdir`` (its ``sync`` paths when given) into sent and kept home
    (see module doc). ``state_dir`` is ``$ORCHD_HOME``."""
    root = Path(spec.workdir).resolve()
    state = state_dir.resolve()
    out = UploadPlan(root)
    named = {str(Path(p)) for p in spec.sync}
    for start in spec.sync or ["."]:
        top = (root / start)
        def pruned(d: Path) -> bool:
            return (_secret((d.name,)) is not None or d.is_symlink() or d.resolve() == state
                    or any(fnmatch(d.name, x) for x in spec.sync_exclude))

        paths = [top] if top.is_file() or top.is_symlink() else sorted(_walk(top, pruned))
        for path in paths:
            rel = str(path.relative_to(root)) if path != root else "."
            parts = Path(rel).parts
            why = None
            if (secret := _secret(parts)) is not None:
                why = f"secret-bearing ({secret})"
            elif path.resolve() == state or state in path.resolve().parents:
                why = "orchd's state directory ($ORCHD_HOME)"
            elif any(fnmatch(p, x) for p in parts for x in spec.sync_exclude):
                why = "sync_exclude"
            elif path.is_symlink() and root not in path.resolve().parents:
                why = "a symlink out of the workdir"
            elif not path.is_file():
                continue
            elif (size := path.stat().st_size) > max_file_bytes and rel not in named:
                why = f"{size / 1e6:.0f} MB, over {max_file_bytes / 1e6:.0f} MB (name it in sync to send it)"
            if why:
                out.kept.append((rel, why))
            else:
                out.files.append((rel, path.stat().st_size))
    return out


def _walk(top: Path, pruned: Callable[[Path], bool]) -> Iterator[Path]:
    """Every file and symlink under ``top``; a directory ``pruned`` says is kept home is yielded
    itself, not entered, so the plan names it once (a .venv is one line, not 30,000)."""
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        for name in list(dirnames):
            if pruned(d / name):
                dirnames.remove(name)
                yield d / name
        for name in filenames:
            yield d / name
