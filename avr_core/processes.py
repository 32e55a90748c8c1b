"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

A worker killed with -9 (or by the OOM killer) must not leave a trainer or a Prefect server
running with no parent: the trainer would keep writing checkpoints beside the next attempt, the
server would hold its port and database forever.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["die_with_parent"]

# Run as `python -c _DIE_WITH_PARENT PARENT_PID ARGV...`: ask Linux for SIGTERM when the parent
# dies (prctl PR_SET_PDEATHSIG = 1; it survives the exec), give up if the parent is already gone,
# then exec ARGV. A launcher rather than Popen's preexec_fn, which may deadlock in a parent with
# threads (fsspec's and Prefect's event loops run in threads here).
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit("parent exited before the child started")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` run so that the process gets SIGTERM when this one dies, even by SIGKILL (Linux;
    elsewhere `argv` as is). Linux signals the death of the *thread* that started the child:
    start it from the main thread (or one that lives as long as the child)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
