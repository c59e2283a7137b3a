"""Entry point of the checkpoint worker process (started by ``aiockpt.CheckpointProcess``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from aiockpt._runtime import run_on_fastest_loop
from aiockpt._wire.protocol import DEFAULT_MAX_FRAME_SIZE
from aiockpt._worker.serve import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiockpt._worker")
    parser.add_argument("--fd", type=int, required=True, help="inherited socketpair end")
    parser.add_argument("--max-frame-size", type=int, default=DEFAULT_MAX_FRAME_SIZE)
    parser.add_argument(
        "--log-level",
        type=int,
        default=logging.WARNING,
        help="level of the worker's 'aiockpt' logger: the trainer's, as it was at the start",
    )
    args = parser.parse_args(argv)
    # Ctrl-C in the trainer's terminal reaches the whole foreground process group; the trainer,
    # not the terminal, decides when its checkpoint worker stops (a save may be committing).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Other libraries' loggers stay at WARNING; aiockpt's follow the trainer's level.
    logging.basicConfig(level=logging.WARNING, format="[aiockpt worker %(process)d] %(message)s")
    logging.getLogger("aiockpt").setLevel(args.log_level)
    return run_on_fastest_loop(serve(args.fd, max_frame_size=args.max_frame_size))


if __name__ == "__main__":
    code = main()
    # Every write is fsynced and answered, and the process group left, by now: skip tearing
    # down torch at interpreter exit, which made each worker's exit take 0.3-1.1 s.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
