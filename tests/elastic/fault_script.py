"""A worker *binary* for the fault tests: ``python -I -S fault_script.py <mode> DIR [args]``.

Standard library only and no ``site``, so that a worker starts in a few milliseconds and a
test can afford many restarts. Every file it announces is written whole (temporary + rename).

Modes:

``stubborn DIR FAIL_RANK``
    Every rank but ``FAIL_RANK`` ignores SIGTERM, writes ``DIR/<local_rank>.pid`` and sleeps.
    ``FAIL_RANK`` (``-1``: none) waits until the others are ignoring SIGTERM, then exits 3.
``crash DIR FAIL_RANK``
    As ``stubborn``, but the other ranks die of SIGTERM as most programs do: ``FAIL_RANK``
    exits 3 while they are surely running.
``stubborn-child DIR``
    The worker starts a child that ignores SIGTERM (``DIR/<local_rank>.child.pid``), then
    writes ``DIR/<local_rank>.pid`` and sleeps; the worker itself dies of SIGTERM.
``crash-loop DIR PAUSES``
    Every worker writes ``DIR/pid_<restart>_<local_rank>`` and a line to stdout. Local rank 0
    exits 1 on every attempt, at once on even restarts and after 20 ms on odd ones; on a
    restart listed in ``PAUSES`` (``5,50``) it first waits for the other ranks' pid files, then
    writes ``DIR/paused_<n>`` and waits for ``DIR/go_<n>``. The other ranks sleep until stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import time

#: a hang guard for the waits below; the test fails long before
_WAIT_S = 60.0


def announce(directory: str, name: str, text: str) -> None:
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def wait_for(path: str) -> None:
    deadline = time.monotonic() + _WAIT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"fault_script: {path} never appeared")
        time.sleep(0.005)


def main(argv: list[str]) -> None:
    mode, directory = argv[1], argv[2]
    local_rank = int(os.environ["LOCAL_RANK"])
    if mode in ("stubborn", "crash"):
        fail_rank = int(argv[3])
        if local_rank == fail_rank:
            for rank in range(int(os.environ["LOCAL_WORLD_SIZE"])):
                if rank != fail_rank:
                    wait_for(os.path.join(directory, f"{rank}.pid"))
            sys.exit(3)
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        announce(directory, f"{local_rank}.pid", str(os.getpid()))
        time.sleep(120)
    elif mode == "stubborn-child":
        import subprocess  # here only: it would double the start-up of every other mode

        # same process group as the worker: only the agent's group-wide SIGKILL reaches it
        child = subprocess.Popen([sys.executable, "-I", "-S", __file__, "ignore-term", directory])
        wait_for(os.path.join(directory, f"{local_rank}.child.pid"))
        announce(directory, f"{local_rank}.pid", str(os.getpid()))
        child.wait()
    elif mode == "ignore-term":  # the child of stubborn-child
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        announce(directory, f"{local_rank}.child.pid", str(os.getpid()))
        time.sleep(120)
    elif mode == "crash-loop":
        restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        pauses = {int(n) for n in argv[3].split(",")}
        announce(directory, f"pid_{restart}_{local_rank}", str(os.getpid()))
        sys.stdout.write(f"rank {local_rank} attempt {restart}\n")
        sys.stdout.flush()
        if local_rank != 0:
            time.sleep(120)
        if restart in pauses:
            # Pause once every worker of the attempt runs, so the test samples a whole set.
            for rank in range(1, int(os.environ["LOCAL_WORLD_SIZE"])):
                wait_for(os.path.join(directory, f"pid_{restart}_{rank}"))
            announce(directory, f"paused_{restart}", "")
            wait_for(os.path.join(directory, f"go_{restart}"))
        if restart % 2:
            time.sleep(0.02)
        sys.stderr.write(f"rank 0 fails attempt {restart}\n")
        sys.exit(1)
    else:
        sys.exit(f"fault_script: unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
