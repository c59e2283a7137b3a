"""Worker *functions* for the fault tests (importable by the function bootstrap); the binary
counterpart, with the same behaviour, is ``fault_script.py``."""

from __future__ import annotations

import os
import sys
import time

from tests.elastic.fault_script import announce, wait_for


def crash_loop(directory: str, pauses: list[int]) -> None:
    """``fault_script.py crash-loop`` as a function: rank 0 raises on every attempt (after
    pausing on the listed restarts), the other ranks sleep until stopped."""
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if int(os.environ["LOCAL_RANK"]) != 0:
        time.sleep(120)
    if restart in pauses:
        announce(directory, f"paused_{restart}", "")
        wait_for(os.path.join(directory, f"go_{restart}"))
    if restart % 2:
        time.sleep(0.02)
    sys.stderr.write(f"rank 0 fails attempt {restart}\n")
    raise RuntimeError(f"attempt {restart} failed")
