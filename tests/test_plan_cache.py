"""Plan reuse: a save of the same structure reuses the last plan, any change makes a new one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import aiockpt
from aiockpt._format.tree import MAX_DEPTH, flatten
from aiockpt._trainer.staging import PlanCache, SharedArena, _walk
from aiockpt._wire.protocol import PlainValue, TensorInArena
from aiockpt._wire.tensors import is_tensor
from tests.test_save import assert_same, every_kind_of_state, zeros_like_tree


def state() -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4)},
        "opt": {0: {"exp_avg": torch.zeros(3, 4)}, "betas": (0.9, 0.99)},
        "step": 1,
    }


def staged_bytes(cache: PlanCache, state_dict: Any) -> list[torch.Tensor]:
    """Copy through the cache's plan into an arena; the tensors the arena then holds."""
    plan = cache.plan(state_dict)
    arena = SharedArena(plan.nbytes)
    try:
        arena.copy_in(plan)
        assert arena.bytes is not None
        return [
            arena.bytes[leaf.offset : leaf.offset + leaf.nbytes].clone()
            for leaf in plan.leaves
            if isinstance(leaf, TensorInArena)
        ]
    finally:
        arena.close()


def test_same_structure_reuses_the_plan_with_the_new_tensors_and_values() -> None:
    cache = PlanCache()
    first = cache.plan(state())
    again = state()
    again["model"]["w"] = torch.full((3, 4), 7.0)
    again["step"] = 2
    second = cache.plan(again)
    assert second.plan_id == first.plan_id
    assert second.sources[0] is again["model"]["w"]
    assert PlainValue(2) in second.leaves and PlainValue(1) not in second.leaves
    staged = staged_bytes(cache, again)
    assert torch.equal(staged[0].view(torch.float32).reshape(3, 4), again["model"]["w"])


def changed(what: str) -> dict[str, Any]:
    sd = state()
    if what == "shape":
        sd["model"]["w"] = torch.zeros(4, 3)
    elif what == "dtype":
        sd["model"]["w"] = sd["model"]["w"].double()
    elif what == "key":
        sd["model"]["weight"] = sd["model"].pop("w")
    elif what == "key type":
        sd["opt"]["0"] = sd["opt"].pop(0)
    elif what == "container":
        sd["opt"]["betas"] = [0.9, 0.99]
    elif what == "leaf kind":
        sd["step"] = torch.tensor(1)
    elif what == "non-contiguous is fine, transposed shape is not":
        sd["model"]["w"] = torch.zeros(4, 3).t()
    elif what == "tied":
        sd["opt"][0]["exp_avg"] = sd["model"]["w"]
    return sd


def test_any_structural_change_makes_a_new_plan() -> None:
    for what in ("shape", "dtype", "key", "key type", "container", "leaf kind", "tied"):
        cache = PlanCache()
        first = cache.plan(state())
        plan = cache.plan(changed(what))
        assert plan.plan_id != first.plan_id, what
        # ...and the new plan is itself reused by the next save of that structure.
        assert cache.plan(changed(what)).plan_id == plan.plan_id or what == "tied", what


class Betas(NamedTuple):
    beta1: float
    beta2: float


def test_the_walk_finds_the_leaves_flatten_finds_in_the_same_order() -> None:
    """The fast walk of a repeated save takes whole containers of leaves at once; what it
    calls a leaf (namedtuples and tensors among ints, at any depth) is what ``flatten`` does,
    and only containers nested too deep stop it."""
    t = torch.zeros(2)
    tree: Any = {
        "model": {"w": t, "b": torch.nn.Parameter(torch.ones(1))},
        "ids": [0, 1, 2, 300],
        "mixed": [t, Betas(0.9, 0.99), [1, (2.0, "x")], None],
        "groups": [{"betas": Betas(0.8, 0.9), "params": [0, 1]}, {1: t, 2: 3}],
    }
    values: list[Any] = []
    structure: list[Any] = []
    assert _walk(tree, values, structure, 0)
    assert [id(v) for v in values] == [id(v) for _, v in flatten(tree, is_tensor)[1]]
    deep: Any = t
    for _ in range(MAX_DEPTH):
        deep = [deep]
    flatten(deep, is_tensor)  # a leaf at the deepest level allowed...
    assert _walk(deep, [], [], 0)
    with pytest.raises(TypeError, match="nests containers"):
        flatten([deep], is_tensor)  # ...and one list deeper
    assert not _walk([deep], [], [], 0)


def test_same_shape_through_a_non_contiguous_view_is_reused_and_copied_right() -> None:
    cache = PlanCache()
    first = cache.plan(state())
    sd = changed("non-contiguous is fine, transposed shape is not")
    assert cache.plan(sd).plan_id == first.plan_id
    staged = staged_bytes(cache, sd)
    assert torch.equal(staged[0].view(torch.float32).reshape(3, 4), sd["model"]["w"])


def test_what_the_guard_sees_but_the_plan_ignores_still_reuses_it() -> None:
    """A repeated save is first checked by torch's TensorGuards (in C); what it checks that
    a plan does not depend on (requires_grad, strides) falls back to the per-tensor
    comparison, which reuses the plan and guards the new tensors for the next save."""
    cache = PlanCache()
    first = cache.plan(state())
    grads = state()
    grads["model"]["w"].requires_grad_(True)
    assert cache.plan(grads).plan_id == first.plan_id
    assert cache._guard is not None and cache._guard.check(
        grads["model"]["w"], *[grads["model"]["b"], grads["opt"][0]["exp_avg"]]
    )
    assert cache.plan(grads).plan_id == first.plan_id
    plain = state()
    plain["model"]["b"] = 1.0  # a tensor leaf now a plain value: planned anew, not guarded
    assert cache.plan(plain).plan_id != first.plan_id
    assert PlainValue(1.0) in cache.plan(plain).leaves


def test_a_tie_that_comes_apart_is_not_reused() -> None:
    cache = PlanCache()
    tied = changed("tied")
    plan = cache.plan(tied)
    assert len(plan.sources) == 2  # w and exp_avg share one copy; b has its own
    untied = state()
    again = cache.plan(untied)
    assert again.plan_id != plan.plan_id
    staged = staged_bytes(cache, untied)
    assert torch.equal(staged[2].view(torch.float32).reshape(3, 4), torch.zeros(3, 4))


def test_tensors_that_start_sharing_memory_are_not_reused_as_separate_copies() -> None:
    cache = PlanCache()
    first = cache.plan(state())
    sd = state()
    sd["opt"][0]["exp_avg"] = sd["model"]["w"]
    assert cache.plan(sd).plan_id != first.plan_id


def test_the_same_tensors_in_place_are_reused_and_changes_through_them_are_seen() -> None:
    """A training run's saves: the very tensors again (one pass, no per-tensor checks past
    it). What changes the same tensor objects' memory or metadata is still seen: a
    parameter given new memory of the same shape is reused with that memory; one given
    another shape, or a sparse layout (no storage to point at), is planned anew (and
    refused by name)."""
    cache = PlanCache()
    sd = state()
    first = cache.plan(sd)
    assert cache.plan(sd).plan_id == first.plan_id
    w = sd["model"]["w"]
    w.data = torch.full((3, 4), 5.0)  # same object, new memory: reused, copied from there
    again = cache.plan(sd)
    assert again.plan_id == first.plan_id and again.sources[0].data_ptr() == w.data_ptr()
    assert torch.equal(staged_bytes(cache, sd)[0].view(torch.float32).reshape(3, 4), w)
    w.data = torch.zeros(4, 3)  # same object, new shape
    assert cache.plan(sd).plan_id != first.plan_id
    sd["model"]["b"] = torch.ones(4).to_sparse()
    with pytest.raises(TypeError, match=r"model.*b"):
        cache.plan(sd)


def bump(state: dict[str, Any], step: int) -> None:
    """Change every value in place (the structure stays): what a training step does."""
    for key, tensor in state["model"].items():
        if tensor.dtype.is_floating_point and tensor.numel() and key != "tied_b":
            tensor.copy_(torch.randn(tensor.shape).to(tensor.dtype))
    state["optimizer"]["state"][0]["exp_avg"].add_(1)
    state["optimizer"]["param_groups"][0]["betas"] = (0.9, 0.999 - step / 1000)
    state["step"] = step


async def load_both(path: Path, like: dict[str, Any]) -> tuple[Any, Any]:
    def load() -> tuple[Any, Any]:
        target = zeros_like_tree(like)
        dcp.load(target, checkpoint_id=str(path), no_dist=True)
        return target, aiockpt.load(path)

    return await asyncio.to_thread(load)


def contiguous(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "model": {k: v.contiguous() for k, v in state["model"].items()}}


async def test_repeated_dcp_saves_reuse_plans_and_load_exactly(tmp_path: Path) -> None:
    """Saves 2 and 3 reuse the caller's plan and the worker's DCP plan, file layout and
    .metadata; a save with a changed shape plans anew. torch's loader and ours read each."""
    state = every_kind_of_state()
    async with aiockpt.Checkpointer(tmp_path) as ckpt:
        for step in range(3):
            bump(state, step)
            await ckpt.save(state, step=step)
            by_torch, by_us = await load_both(tmp_path / f"step_{step:010d}", state)
            assert_same(by_torch, contiguous(state))
            assert_same(by_us, state)
        state["model"]["f32"] = torch.randn(7, 5)
        state["optimizer"]["state"][0]["exp_avg"] = torch.randn(2)
        await ckpt.save(state, step=3)
        by_torch, by_us = await load_both(tmp_path / "step_0000000003", state)
        assert_same(by_torch, contiguous(state))
        assert_same(by_us, state)


@pytest.mark.parametrize("count", [3000])
async def test_repeated_saves_of_many_small_tensors_in_both_formats(
    tmp_path: Path, count: int
) -> None:
    """Thousands of tensors go out in gathered writes; each save still reads back exactly."""
    state: dict[str, Any] = {f"t{i}": torch.randn(i % 7 + 1) for i in range(count)}
    state["step"] = 0
    async with aiockpt.Checkpointer(tmp_path) as ckpt:
        for step, fmt in enumerate(["dcp", "dcp", "safetensors", "safetensors"]):
            for i in range(0, count, 97):
                state[f"t{i}"].add_(step)
            state["step"] = step
            path = tmp_path / f"s{step}"
            await ckpt.save_to(state, path, format=fmt)
            loaded = await asyncio.to_thread(aiockpt.load, path)
            assert_same(loaded, state)
            if fmt == "safetensors":
                tensors = await asyncio.to_thread(
                    safetensors.torch.load_file, str(path / "model.safetensors")
                )
                assert torch.equal(tensors["t97"], state["t97"])
            else:
                target = {k: torch.zeros_like(v) for k, v in state.items() if k != "step"}
                await asyncio.to_thread(dcp.load, target, checkpoint_id=str(path), no_dist=True)
                assert torch.equal(target["t97"], state["t97"])
