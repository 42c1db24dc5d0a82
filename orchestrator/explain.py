"""Why did it fail? From the end of a failed attempt's log and its exit code: the error lines a
person would look for (the last traceback's last frame and its message, else the last line
that says error) and a well-known cause when there is one:

- ``gpu_oom``: PyTorch's ``torch.OutOfMemoryError`` / ``CUDA out of memory`` / ``HIP out of
  memory`` (ROCm), ``CUDA error: out of memory``, ``hipErrorOutOfMemory``;
- ``oom_killed``: the kernel's OOM killer said so (slurmstepd's ``Detected N oom_kill event(s)``,
  ``oom-kill``, the kernel's ``Out of memory: Killed process``);
- ``sigkill``: exit 137 (128 + SIGKILL) with the shell's ``Killed``: often the OOM killer, but
  a SIGKILL from anyone looks the same, so the attempt keeps its state;
- ``nccl``: a collective failed (``NCCL error``, ``ncclInternalError``/``ncclSystemError``/...,
  ``RCCL``, ProcessGroupNCCL's watchdog timeout).

The first two end the attempt OUT_OF_MEMORY (so ``retry.on: [OUT_OF_MEMORY]`` with a smaller
batch applies to both); the text goes into the attempt's reason, ``orchd show`` and the mail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAIL_BYTES = 32 * 1024  # the end of the log that is read: a traceback is rarely longer
MAX_LINES = 8

_CAUSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("gpu_oom", re.compile(r"OutOfMemoryError|(CUDA|HIP) out of memory|CUDA error: out of memory|"
                           r"hipErrorOutOfMemory", re.I)),
    ("oom_killed", re.compile(r"oom[-_]kill|Out of memory: Killed process", re.I)),
    ("nccl", re.compile(r"NCCL error|nccl(Internal|System|UnhandledCuda|InvalidUsage|Remote)Error|RCCL error|"
                        r"ProcessGroupNCCL.*(timeout|Timeout|timed out)|NCCL WARN", re.I)),
)
SUMMARY = {"gpu_oom": "GPU out of memory", "oom_killed": "killed by the out-of-memory killer",
           "nccl": "NCCL/RCCL collective failed",
           "sigkill": "killed by SIGKILL (exit 137; often the out-of-memory killer)"}
_ERRORISH = re.compile(r"error|exception|fatal|killed|abort|segmentation fault", re.I)


@dataclass(frozen=True)
class Explanation:
    """``cause``: "gpu_oom" | "oom_killed" | "nccl" | "sigkill" | None; ``message``: one line for a reason;
    ``lines``: the error lines (at most ``MAX_LINES``)."""

    cause: str | None
    message: str
    lines: tuple[str, ...]

    @property
    def out_of_memory(self) -> bool:
        return self.cause in ("gpu_oom", "oom_killed")


def _traceback_lines(lines: list[str]) -> list[str]:
    """The last traceback's last frame (``File ...`` and its code line) and its message."""
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if not starts:
        return []
    tb = lines[starts[-1] + 1:]
    frames = [i for i, ln in enumerate(tb) if ln.lstrip().startswith('File "')]
    end = next((i for i in range(frames[-1] + 1 if frames else 0, len(tb))
                if tb[i] and not tb[i].startswith((" ", "\t"))), None)
    if end is None:
        return []
    frame = tb[frames[-1]:frames[-1] + 2] if frames else []
    message = [ln for ln in tb[end:end + 3] if ln.strip()]
    return [ln.rstrip() for ln in frame + message][:MAX_LINES]


def explain(tail: bytes, exit_code: int | None) -> Explanation | None:
    """The explanation of a failed attempt from ``tail`` (the last bytes of its log, see
    ``TAIL_BYTES``) and its exit code; None when there is nothing to say."""
    text = tail.decode("utf-8", "replace").replace("\r", "\n")
    lines = [ln for ln in text.split("\n") if ln.strip()]
    cause = next((name for name, rx in _CAUSES if any(rx.search(ln) for ln in lines[-200:])), None)
    if cause is None and exit_code == 137 and any(ln.strip() == "Killed" or ln.endswith(" Killed")
                                                  for ln in lines[-20:]):
        cause = "sigkill"
    shown = _traceback_lines(lines)
    if not shown:
        hits = [ln.rstrip() for ln in lines[-200:] if _ERRORISH.search(ln)]
        shown = hits[-3:]
    if cause is None and not shown:
        if exit_code == 137:  # 128 + SIGKILL, with nothing logged: say what it usually is
            return Explanation(None, "exit 137: killed by SIGKILL (often the out-of-memory killer)", ())
        return None
    last = shown[-1].strip() if shown else ""
    message = f"{SUMMARY[cause]}: {last}" if cause and last else (SUMMARY[cause] if cause else last)
    return Explanation(cause, message[:300], tuple(ln[:300] for ln in shown))
