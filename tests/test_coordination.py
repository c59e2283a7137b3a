"""The store protocol of multi-rank saves, on a real TCPStore in this process."""

from __future__ import annotations

import datetime
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import torch.distributed as dist

from aiockpt._format.loading import load
from aiockpt._format.reading import verify
from aiockpt._wire.coordination import SaveRound, connect_store, keys_owned_by
from aiockpt._wire.protocol import CommitOptions, GcOptions, GroupInfo, RankInfo
from aiockpt._worker.rank_group import Outcome, RankGroup
from aiockpt.errors import CoordinationError, CoordinationTimeout, RankFailed, qualified_name
from aiockpt.writers.dcp import DcpWriter
from tests.writer_fixtures import assert_same


@pytest.fixture
def group() -> Iterator[tuple[GroupInfo, dist.TCPStore]]:
    server = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=10),
    )  # fmt: skip
    info = GroupInfo("127.0.0.1", server.port, "", "test-session", 0, 2, 0, timeout_s=0.3)
    yield info, server


def rounds(info: GroupInfo, server: dist.TCPStore, round_id: str = "step_1#0") -> list[SaveRound]:
    return [
        SaveRound(connect_store(info, base=server), round_id, rank=r, world_size=2, timeout_s=0.3)
        for r in range(2)
    ]


def test_every_rank_reads_the_value_its_owner_posted(
    group: tuple[GroupInfo, dist.TCPStore],
) -> None:
    rank0, rank1 = rounds(*group)
    rank0.post("prepared", "/tmp/x")
    assert rank1.collect(["prepared"], [0]) == ["/tmp/x"]
    # A failure posted later (a trainer reporting its dead worker) does not overwrite it.
    rank0.fail(OSError("late"), ["prepared"])
    assert rank1.collect(["prepared"], [0]) == ["/tmp/x"]


def test_a_failure_reaches_every_reader_naming_its_rank_and_traceback(
    group: tuple[GroupInfo, dist.TCPStore],
) -> None:
    rank0, rank1 = rounds(*group)
    try:
        raise OSError("disk on fire")
    except OSError as exc:
        rank1.fail(exc)
    with pytest.raises(RankFailed) as caught:
        rank0.collect(["plan/1"], [1])
    assert caught.value.rank == 1
    assert caught.value.error_type == "OSError"
    assert "disk on fire" in (caught.value.traceback or "")
    # Rank 0 passes the failure on to the outcome: it still names rank 1, not rank 0.
    rank0.fail(caught.value)
    with pytest.raises(RankFailed) as outcome:
        rank1.collect(["outcome"], [0])
    assert outcome.value.rank == 1
    assert outcome.value.error_type == "OSError"


def test_a_reader_that_gives_up_posts_a_timeout_the_late_owner_then_meets(
    group: tuple[GroupInfo, dist.TCPStore],
) -> None:
    rank0, rank1 = rounds(*group)
    with pytest.raises(CoordinationTimeout) as caught:
        rank0.collect(["part/1"], [1])
    assert caught.value.rank == 1
    assert "rank 1 did not reach step 'part/1'" in str(caught.value)
    # The late rank fails at once instead of waiting in a save the others abandoned.
    with pytest.raises(CoordinationTimeout):
        rank1.post("part/1", {"late": True})


def test_collect_waits_for_values_posted_meanwhile(group: tuple[GroupInfo, dist.TCPStore]) -> None:
    info, server = group
    rank0, _ = rounds(info, server)
    rank0.timeout_s = 10
    # Its own client, as in its own process: a client blocked in wait serves nobody else.
    rank1 = SaveRound(connect_store(info), "step_1#0", rank=1, world_size=2, timeout_s=10)
    poster = threading.Timer(0.1, lambda: rank1.post("plan/1", [1, 2, 3]))
    poster.start()
    try:
        assert rank0.collect(["plan/1"], [1]) == [[1, 2, 3]]
    finally:
        poster.join()


def test_saves_do_not_see_each_others_keys_and_forget_removes_them(
    group: tuple[GroupInfo, dist.TCPStore],
) -> None:
    info, server = group
    first, _ = rounds(info, server, round_id="step_1#0")
    second, _ = rounds(info, server, round_id="step_2#0")
    first.post("prepared", "a")
    second.post("prepared", "b")
    assert second.collect(["prepared"], [0]) == ["b"]
    first.forget()
    session = connect_store(info, base=server)
    assert not session.check(["save/step_1#0/prepared"])
    assert session.check(["save/step_2#0/prepared"])


def test_each_rank_owes_its_own_keys_and_rank_0_the_shared_ones() -> None:
    assert keys_owned_by(1) == ["plan/1", "part/1"]
    assert keys_owned_by(0) == ["prepared", "plan/0", "assign", "part/0", "outcome"]


def test_torch_gc_environment_variables_map_to_gc_options() -> None:
    assert GcOptions.from_env({}) == GcOptions()
    assert GcOptions.from_env({"DCP_DISABLE_AUTOMATIC_GC": "1"}) == GcOptions(
        disable_automatic=True, collect_after_write=True, freeze_after_first_write=True
    )
    assert GcOptions.from_env(
        {"DCP_DISABLE_AUTOMATIC_GC": "1", "DCP_DISABLE_MANUAL_GC": "1"}
    ) == GcOptions(disable_automatic=True)


def test_exception_types_are_named_as_across_the_boundary() -> None:
    assert qualified_name(OSError) == "OSError"
    assert qualified_name(RankFailed) == "aiockpt.errors.RankFailed"


# --- One multi-rank save through commit.write_checkpoint, each rank a thread with its own
# RankGroup (its own store client), as the workers run it.


def save_by_ranks(
    info: GroupInfo,
    path: str,
    states: list[dict[str, Any]],
    before_commit: list[Callable[[], None]],
) -> list[Any]:
    """Every rank's outcome (or the exception it raised), in rank order."""
    outcomes: list[Any] = [None] * len(states)

    def rank_main(rank: int) -> None:
        group = RankGroup(msgspec.structs.replace(info, rank=rank, pg_generation=None))
        writer = DcpWriter(RankInfo(global_rank=rank, global_world_size=len(states)))
        options = CommitOptions("dcp", round_id="r1")
        try:
            outcomes[rank] = group.write_and_commit(
                writer, states[rank], {}, path, options, begin_commit=before_commit[rank]
            )
        except Exception as exc:
            outcomes[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(states))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def nothing() -> None:
    pass


def test_a_multi_rank_save_commits_once_through_the_one_commit_function(
    group: tuple[GroupInfo, dist.TCPStore], tmp_path: Path
) -> None:
    info = msgspec.structs.replace(group[0], timeout_s=10)
    # "shared" is replicated (DCP writes it once); each rank's own tensor is its own.
    states = [{f"rank{r}": torch.full((4,), float(r)), "shared": torch.ones(2)} for r in range(2)]
    path = str(tmp_path / "ckpt")
    outcomes = save_by_ranks(info, path, states, [nothing, nothing])
    assert [type(o) for o in outcomes] == [Outcome, Outcome]
    assert outcomes[0].result == outcomes[1].result and outcomes[0].result.path == path
    # Neither worker had a process group: both are told to form one under the same generation.
    assert outcomes[0].regroup is not None and outcomes[0].regroup == outcomes[1].regroup
    manifest = verify(path)
    assert manifest.world_size == 2
    for rank in range(2):
        assert_same(load(path, rank=rank), states[rank])
    assert os.listdir(tmp_path) == ["ckpt"]


def test_a_rank_cancelled_before_its_commit_fails_every_rank_and_leaves_nothing(
    group: tuple[GroupInfo, dist.TCPStore], tmp_path: Path
) -> None:
    info = msgspec.structs.replace(group[0], timeout_s=10)
    states = [{"w": torch.full((4,), float(r))} for r in range(2)]

    def cancelled() -> None:
        raise RuntimeError("cancelled before its commit")

    outcomes = save_by_ranks(info, str(tmp_path / "ckpt"), states, [nothing, cancelled])
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[0], RankFailed) and outcomes[0].rank == 1
    assert "cancelled before its commit" in str(outcomes[0])
    assert os.listdir(tmp_path) == []


# --- torch's store errors come out as aiockpt's, with the cause chained.


def own_store() -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=10),
    )  # fmt: skip


def test_an_unreachable_store_is_a_coordination_error() -> None:
    server = own_store()
    port = server.port
    del server  # nothing listens there any more
    info = GroupInfo("127.0.0.1", port, "", "s", 1, 2, 0, timeout_s=0.2)
    with pytest.raises(CoordinationError, match=f"connecting to 127.0.0.1:{port}") as caught:
        connect_store(info)
    assert isinstance(caught.value.__cause__, dist.DistError)


def test_a_store_that_goes_away_mid_save_is_a_coordination_error() -> None:
    server = own_store()
    info = GroupInfo("127.0.0.1", server.port, "", "s", 0, 2, 0, timeout_s=0.2)
    round_ = SaveRound(connect_store(info), "r", rank=0, world_size=2, timeout_s=0.2)
    round_.post("prepared", "/tmp/x")
    del server  # the store's server stops
    with pytest.raises(CoordinationError, match="save 'r', step 'assign'") as caught:
        round_.post("assign", [[0], [0]])
    assert isinstance(caught.value.__cause__, RuntimeError)  # torch's DistError is one
