from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.leaks import Snapshot
from tests.writer_fixtures import WriteGateFiles


def pytest_configure(config: pytest.Config) -> None:
    """Give this test session a temp directory of its own (inherited by every subprocess),
    so that the leak check sees only what this session created, even when other runs share
    the machine."""
    session_tmp = tempfile.mkdtemp(prefix=f"pytest-session-{os.getpid()}-")
    os.environ["TMPDIR"] = session_tmp
    tempfile.tempdir = session_tmp
    config.add_cleanup(lambda: shutil.rmtree(session_tmp, ignore_errors=True))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection imported (torch, DCP, every test module): the leak check's
    ``gc.collect()`` after each test then walks only what tests created since, not torch's
    million objects (0.1-0.4 s a test, minutes a run, before). Only imports: what a test
    leaves in a cycle (a TCPStore, a socket) must still be collected after it, so nothing
    later is frozen."""
    # Hypothesis' plugins (trio's) check their PRNG's referrers with gc.get_referrers,
    # which cannot see frozen objects: let them register before the freeze.
    import hypothesis  # noqa: F401

    gc.collect()
    gc.freeze()


try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency wherever the platform has it
    uvloop = None  # type: ignore[assignment]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs once on the default asyncio loop and once on uvloop."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


class _LoopErrorRecorder(logging.Handler):
    """Both loops report unhandled task and callback exceptions through asyncio's logger."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_leaks_and_no_loop_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test that leaves processes, shared memory or temp files, or that lets the
    event loop log an unhandled exception ("Task exception was never retrieved", ...)."""
    before = Snapshot.take()
    recorder = _LoopErrorRecorder()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(recorder)
    try:
        yield
    finally:
        asyncio_logger.removeHandler(recorder)
    problems = before.leaked_since()  # collects the test's garbage, cycles included
    problems += [f"event loop error: {r.getMessage()}" for r in recorder.records]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[WriteGateFiles]:
    """The gate files of a held write (``GatedDcpWriter``, ``RawWriter(gate=...)``)."""
    yield from WriteGateFiles.around(tmp_path)
