"""Multi-rank saves end to end: 2 and 3 trainer ranks as real processes in a gloo group over a
real TCPStore on 127.0.0.1, each with its checkpoint worker; checked with torch's DCP loader.

The ranks run on asyncio or uvloop (alternating between tests); each test's observations come
back from ``tests.multirank.rank_main`` as JSON.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import aiockpt
from tests.multirank.hf_scenarios import COLUMN_SHAPES, column_whole, tiny_gpt2
from tests.multirank.launch import run_ranks, run_scenarios
from tests.multirank.rank_main import (
    COLS,
    EMB_COLS,
    EMB_ROWS,
    ROWS,
    full,
    replicated_state,
    reshard_full,
)

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.parametrize(
    ("world_size", "loop", "prefix_store"),
    [(2, "asyncio", False), (3, "uvloop", True)],
    ids=["2ranks-own-store-asyncio", "3ranks-prefix-store-uvloop"],
)
def test_replicated_state_dict_is_one_checkpoint_written_once(
    tmp_path: Path, world_size: int, loop: str, prefix_store: bool
) -> None:
    env = {"DCP_USE_PREFIX_STORE": "1" if prefix_store else "0"}
    results = run_ranks("replicated", world_size, tmp_path, loop=loop, env=env)

    expected_prefix = "AsyncCheckpointProcess/" if prefix_store else ""
    assert [r["prefix"] for r in results] == [expected_prefix] * world_size
    latest = results[0]["latest"]
    assert latest.endswith("step_0000000003")
    for rank, observed in enumerate(results):
        # One checkpoint per step for all ranks; keep_last=2 deleted step 1 exactly once.
        assert observed["latest"] == latest
        assert observed["listing"] == ["step_0000000002", "step_0000000003"]
        # Each rank resumes its own state dict.
        assert observed["loaded_rank_value"] == rank
        assert observed["loaded_matches"]
        assert aiockpt.load(latest, rank=rank)["rank_value"] == rank

    manifest = aiockpt.verify(latest)
    assert manifest.world_size == world_size
    expected = replicated_state(3, rank=0)
    target = {"model": {"w": torch.zeros(64, 32), "b": torch.zeros(32)}, "step": -1}
    dcp.load(target, checkpoint_id=latest)
    assert torch.equal(target["model"]["w"], expected["model"]["w"])
    assert torch.equal(target["model"]["b"], expected["model"]["b"])
    assert target["step"] == 3
    # Rank 0 alone published the weights with no_dist=True.
    published = safetensors.torch.load_file(Path(results[0]["published"], "model.safetensors"))
    assert torch.equal(published["w"], expected["model"]["w"])
    # Replicated tensors are written by one rank each, not once per rank.
    data = sum(f.stat().st_size for f in Path(latest).glob("*.distcp"))
    one_copy = (64 * 32 + 32) * 4
    assert one_copy <= data < 1.5 * one_copy + 16384, data


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """One launch of 2 ranks (uvloop) for the scenarios that save or load once and are then
    only read: the DTensor save, the resharding save, and the sharded load of a one-rank
    checkpoint saved here first. Each test checks its own scenario's observations."""
    root = tmp_path_factory.mktemp("two_ranks")

    async def save_on_one_rank() -> str:
        async with aiockpt.Checkpointer(root / "one_rank") as ckpt:
            return (await ckpt.save({"w": full("w")}, step=1)).path

    one_rank = asyncio.run(save_on_one_rank())
    scenarios = [("dtensor_save", None), ("reshard_save", None), ("dtensor_load", one_rank)]
    return run_scenarios(scenarios, 2, root / "ranks", loop="uvloop")


@pytest.fixture(scope="module")
def three_ranks(
    two_ranks: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict[str, Any]]]:
    """One launch of 3 ranks loading what the 2 ranks saved: the DTensor checkpoint, and the
    latest under the resharding save's root."""
    scenarios = [
        ("dtensor_load", two_ranks["dtensor_save"][0]["path"]),
        ("reshard_load", str(Path(two_ranks["reshard_save"][0]["path"]).parent)),
    ]
    return run_scenarios(scenarios, 3, tmp_path_factory.mktemp("three_ranks"))


# first: its set-up is one launch, the next test's the other (each test is bounded)
def test_one_rank_checkpoint_loads_sharded_on_2_ranks(
    two_ranks: dict[str, list[dict[str, Any]]],
) -> None:
    loaded = two_ranks["dtensor_load"]
    assert [r["local_rows"] for r in loaded] == [4, 4]
    assert all(r["matches"] for r in loaded)


def test_dtensor_shards_save_on_2_ranks_and_reshard_on_load(
    two_ranks: dict[str, list[dict[str, Any]]], three_ranks: dict[str, list[dict[str, Any]]]
) -> None:
    saved = two_ranks["dtensor_save"]
    path = saved[0]["path"]
    assert [r["path"] for r in saved] == [path, path]
    # Each rank wrote and reloads its own piece.
    assert saved[0]["local_w"] == full("w")[: ROWS // 2].tolist()
    assert saved[1]["local_w"] == full("w")[ROWS // 2 :].tolist()
    assert all(r["reloaded_own_shards"] for r in saved)

    # 2 -> 1: torch's loader assembles the whole tensors, in this process.
    whole = {name: torch.zeros(ROWS, COLS) for name in ("w", "a", "b")}
    dcp.load(whole, checkpoint_id=path)
    for name, tensor in whole.items():
        assert torch.equal(tensor, full(name)), name

    # 2 -> 3: uneven shards of 3, 3 and 2 rows.
    loaded = three_ranks["dtensor_load"]
    assert [r["local_rows"] for r in loaded] == [3, 3, 2]
    assert all(r["matches"] for r in loaded)


def test_2_rank_sharded_checkpoint_loads_whole_resharded_or_refused(
    two_ranks: dict[str, list[dict[str, Any]]], three_ranks: dict[str, list[dict[str, Any]]]
) -> None:
    saved = two_ranks["reshard_save"]
    path = saved[0]["path"]
    assert [r["path"] for r in saved] == [path, path]
    assert [r["local_rows"] for r in saved] == [49, 48]
    whole = reshard_full()

    # (a) One offline process, no target: whole tensors, not rank 0's 49 rows.
    loaded = aiockpt.load(path)
    assert torch.equal(loaded["emb"], whole["emb"])
    assert torch.equal(loaded["bias"], whole["bias"])
    assert loaded["step"] == 7
    # (c) One process into plain tensors of the full shape.
    target = {"emb": torch.zeros(EMB_ROWS, EMB_COLS), "bias": torch.zeros(EMB_COLS)}
    aiockpt.load(path, target)
    assert torch.equal(target["emb"], whole["emb"])
    assert torch.equal(target["bias"], whole["bias"])
    # (d) A shape that is neither the whole nor a piece asked for: says what was saved.
    with pytest.raises(ValueError, match=r"saved by 2 ranks") as info:
        aiockpt.load(path, {"emb": torch.zeros(49, EMB_COLS)})
    assert "[97, 48]" in str(info.value) and "[49, 48]" in str(info.value)
    # ... and at the saved world size, rank 1 still gets exactly its own piece.
    piece = aiockpt.load(path, {"emb": torch.zeros(48, EMB_COLS)}, rank=1)["emb"]
    assert torch.equal(piece, whole["emb"][49:])
    # (f) torch's own loader agrees.
    by_dcp = {"emb": torch.zeros(EMB_ROWS, EMB_COLS), "bias": torch.zeros(EMB_COLS)}
    dcp.load(by_dcp, checkpoint_id=path)
    assert torch.equal(by_dcp["emb"], whole["emb"])

    # (b), (e) An elastic restart at 3 ranks: load_latest gives each DTensor its 33, 33, 31
    # rows and every rank the whole replicated tensor.
    resumed = three_ranks["reshard_load"]
    assert [r["local_rows"] for r in resumed] == [33, 33, 31]
    for observed in resumed:
        assert observed["emb_matches"] and observed["bias_matches"]
        assert observed["step"] == 7


@pytest.mark.faults
def test_failure_on_one_rank_fails_every_rank_then_the_next_save_succeeds(
    tmp_path: Path,
) -> None:
    results = run_ranks("failure", 2, tmp_path, loop="uvloop")

    failing, other = results[1], results[0]
    assert failing["first"]["type"] == "CheckpointWriteError"
    assert other["first"]["type"] == "RankFailed"
    assert other["first"]["rank"] == 1
    assert other["first"]["error_type"] == "OSError"
    assert "injected failure on rank 1" in other["first_traceback"]
    for observed in results:
        assert "injected failure on rank 1" in observed["first"]["message"]
        # Nothing was committed, no temporary directory is left, and the workers still serve.
        assert observed["second"].endswith("step_0000000002")
        assert observed["listing"] == ["step_0000000002"]


@pytest.mark.faults
def test_worker_killed_on_one_rank_fails_that_save_everywhere_then_regroups(
    tmp_path: Path,
) -> None:
    results = run_ranks("kill_worker", 2, tmp_path)

    assert results[1]["first"]["type"] == "WorkerCrashed"
    assert results[0]["first"]["type"] == "RankFailed"
    assert results[0]["first"]["rank"] == 1
    assert results[0]["first"]["error_type"] == "aiockpt.errors.WorkerCrashed"
    # Rank 0 learns from rank 1's trainer, not from a timeout (60 s here).
    assert results[0]["seconds_to_fail"] < 30
    assert "step_0000000001" not in results[0]["listing_after_failure"]
    for observed in results:
        assert observed["second"].endswith("step_0000000002")
    assert results[1]["respawned"] and not results[0]["respawned"]
    # The workers' gloo group worked before the crash and again, with rank 1's new worker in
    # it, after the save that followed it.
    before, after = results[0]["sums"]["sum_before"], results[0]["sums"]["sum_after"]
    assert len([f for f in after if f.startswith("sum-")]) == 2
    assert before != after
    assert results[0]["sum_values"] == [results[0]["expected_sum"]] * 2


@pytest.mark.faults
def test_rank_that_never_arrives_times_out_and_the_late_rank_fails_at_once(
    tmp_path: Path,
) -> None:
    results = run_ranks("late_rank", 2, tmp_path)

    for observed in results:
        assert observed["first"]["type"] == "CoordinationTimeout"
        assert observed["first"]["rank"] == 1
        assert observed["second"].endswith("step_0000000002")
        assert observed["listing"] == ["step_0000000002"]
    assert 3.5 < results[0]["seconds_to_fail"] < 30  # the configured 4 s, not a hang
    assert results[1]["seconds_to_fail"] < 3  # the others had given up on it already


def test_prefix_store_without_master_addr_is_a_clear_error_on_every_rank(
    tmp_path: Path,
) -> None:
    env = {"DCP_USE_PREFIX_STORE": "1", "MASTER_ADDR": None}
    results = run_ranks("start_only", 2, tmp_path, loop="uvloop", env=env)

    for observed in results:
        assert observed["error"]["type"] == "ValueError"
        assert "MASTER_ADDR is not set" in observed["error"]["message"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_from_pretrained_reads_a_safetensors_save_from_any_number_of_ranks(
    tmp_path: Path, world_size: int
) -> None:
    from transformers import GenerationConfig, GPT2LMHeadModel

    saved = run_ranks("hf_save", world_size, tmp_path, loop="asyncio")
    path = Path(saved[0]["path"])
    assert [r["own_pieces"] for r in saved] == [True] * world_size
    model = tiny_gpt2()
    expected = model.state_dict()

    files = sorted(path.glob("*.safetensors"))
    assert len(files) > 1 and (path / "model.safetensors.index.json").exists()
    # Every tensor in exactly one file, whole, with the model's values.
    found: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in safetensors.torch.load_file(file).items():
            assert name not in found, f"{name} written twice"
            found[name] = tensor
    assert found.keys() == expected.keys()
    assert all(torch.equal(found[name], expected[name]) for name in expected)
    nbytes = sum(t.nbytes for t in expected.values())
    assert nbytes <= sum(f.stat().st_size for f in files) < nbytes + 2048 * len(files)

    reloaded = GPT2LMHeadModel.from_pretrained(
        path, config=model.config, generation_config=GenerationConfig()
    ).eval()
    tokens = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    # aiockpt's own loader verifies it and assembles the whole tensors.
    assert aiockpt.verify(path).world_size == world_size
    target = {name: torch.zeros_like(tensor) for name, tensor in expected.items()}
    aiockpt.load(path, target)
    assert all(torch.equal(target[name], expected[name]) for name in expected)


def test_column_sharded_dtensors_save_as_safetensors_and_dcp_on_2_ranks(tmp_path: Path) -> None:
    saved = run_ranks("column_shards", 2, tmp_path, loop="uvloop")
    path, dcp_path = Path(saved[0]["path"]), saved[0]["dcp_path"]
    wholes = {name: column_whole(name) for name in COLUMN_SHAPES}
    # (a) Every rank reloads exactly its own pieces, every way a rank resumes, both formats.
    for rank, observed in enumerate(saved):
        assert len(observed["checks"]) == 9
        failed = {
            name: outcome for name, outcome in observed["checks"].items() if outcome is not True
        }
        assert failed == {}, f"rank {rank}"

    # (b) One process: the whole tensors, assembled by aiockpt (both formats) and by torch's
    # own DCP loader.
    for saved_path in (path, dcp_path):
        loaded = aiockpt.load(saved_path)
        assert all(torch.equal(loaded[name], whole) for name, whole in wholes.items()), saved_path
    by_dcp = {name: torch.zeros_like(whole) for name, whole in wholes.items()}
    dcp.load(by_dcp, checkpoint_id=dcp_path)
    assert all(torch.equal(by_dcp[name], whole) for name, whole in wholes.items())

    # (c) safetensors' own reader: every tensor once, whole, each rank's piece in its place
    # (DTensor cuts 7 columns into 4 + 3, the cube's 5 into 3 + 2).
    (file,) = path.glob("*.safetensors")
    with safetensors.safe_open(file, framework="pt") as opened:
        assert sorted(opened.keys()) == sorted(wholes)
        for name, whole in wholes.items():
            assert torch.equal(opened.get_tensor(name), whole), name
        for rank, (cols, cube) in enumerate(
            [(slice(0, 4), slice(0, 3)), (slice(4, 7), slice(3, 5))]
        ):
            pieces = saved[rank]["pieces"]
            assert opened.get_slice("cols")[:, cols].tolist() == pieces["cols"], rank
            assert opened.get_slice("cube")[:, cube].tolist() == pieces["cube"], rank
