"""An agent with a *function* entrypoint in a process of its own, for tests that kill it:
``python -m tests.elastic.function_agent DIR`` runs 2 workers that write DIR/<rank>.pid."""

from __future__ import annotations

import asyncio
import os
import sys

from aiockpt.elastic import LocalElasticAgent, LogsSpecs, WorkerSpec
from tests.elastic import workers


async def main(directory: str) -> None:
    spec = WorkerSpec("trainer", 2, workers.write_pid_then_sleep, (directory,), max_restarts=0)
    await LocalElasticAgent(spec, LogsSpecs(log_dir=os.path.join(directory, "logs"))).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
