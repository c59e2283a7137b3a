"""A worker for the membership tests: ``python membership_worker.py DIR``.

Joins a gloo group through env://, then writes ``DIR/running/ws<W>-port<P>-rank<R>.json``
(its ranks, world size and restart count) and all-reduces a flag in a loop until some worker
sees ``DIR/finish``; all of them then leave together and exit 0. A peer that dies fails the
all-reduce, so the worker exits 1 at once, as a training step would fail.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main(directory: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    env = {
        key: os.environ[key]
        for key in (
            "RANK", "WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "LOCAL_RANK",
            "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT",
        )
    }  # fmt: skip
    env["pid"] = str(os.getpid())
    flag = torch.zeros(1)
    dist.all_reduce(flag)  # every member is in: the group is really running
    running = os.path.join(directory, "running")
    os.makedirs(running, exist_ok=True)
    name = f"ws{env['WORLD_SIZE']}-port{env['MASTER_PORT']}-rank{env['RANK']}.json"
    with open(os.path.join(running, name + ".tmp"), "w") as f:
        json.dump(env, f)
    os.rename(os.path.join(running, name + ".tmp"), os.path.join(running, name))
    finish = os.path.join(directory, "finish")
    try:
        while True:
            flag = torch.tensor([1.0 if os.path.exists(finish) else 0.0])
            dist.all_reduce(flag)
            if flag.item() > 0:
                break
            time.sleep(0.05)
    except RuntimeError:  # torch's DistError: a peer is gone
        traceback.print_exc()
        # at once: the process group's clean-up at interpreter exit can block on the dead
        # peer, and the test wants the failure seen as one, not as a hang
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
