"""A worker *binary* for the agent tests: ``python worker_script.py <mode> [args]``.

Modes: ``exit-rank R CODE DIR`` (the other ranks write ``DIR/<local_rank>.up`` and sleep;
local rank R exits CODE once every other rank's file is there, so surely while they run),
``record-raise MESSAGE`` (an ``@record`` main raising ValueError), ``print N``,
``pid-then-sleep DIR`` (write DIR/<local_rank>.pid, note SIGTERM in DIR/<local_rank>.term),
``gloo-crash-once`` (join a gloo group through env://; rank 1 dies on the first attempt).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType


def main(argv: list[str]) -> None:
    mode = argv[1]
    local_rank = int(os.environ["LOCAL_RANK"])
    if mode == "exit-rank":
        directory = argv[4]
        if local_rank == int(argv[2]):
            siblings = set(range(int(os.environ["LOCAL_WORLD_SIZE"]))) - {local_rank}
            deadline = time.monotonic() + 60  # a hang guard: the test fails on the exit code
            while not all(os.path.exists(os.path.join(directory, f"{r}.up")) for r in siblings):
                if time.monotonic() > deadline:
                    sys.exit(99)
                time.sleep(0.005)
            sys.exit(int(argv[3]))
        open(os.path.join(directory, f"{local_rank}.up"), "w").close()
        time.sleep(60)
    elif mode == "record-raise":
        from aiockpt.elastic import record

        @record
        def failing_main() -> None:
            raise ValueError(argv[2])

        failing_main()
    elif mode == "print":
        for i in range(int(argv[2])):
            print(f"line {i} of rank {local_rank}", flush=True)
    elif mode == "pid-then-sleep":
        directory = argv[2]

        def on_term(signum: int, frame: FrameType | None) -> None:
            open(os.path.join(directory, f"{local_rank}.term"), "w").close()
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
        path = os.path.join(directory, f"{local_rank}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(path + ".tmp", path)
        time.sleep(120)
    elif mode == "gloo-crash-once":
        # torch's own env:// rendezvous, as most training scripts do it; a restarted group
        # must meet in a store of its own, not among the dead group's keys.
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        total = torch.ones(1)
        dist.all_reduce(total)
        if dist.get_rank() == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            os._exit(1)
        dist.barrier()
        print(f"attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} sum {total.item():.0f}")
        dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
