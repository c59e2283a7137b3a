"""Plan reuse: a save of the same structure reuses the last plan, any change makes a new one."""

from __future__ import annotations

from typing import Any

import torch

from aiockpt.protocol import PlainValue, TensorInArena
from aiockpt.staging import PlanCache, SharedArena


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


def test_same_shape_through_a_non_contiguous_view_is_reused_and_copied_right() -> None:
    cache = PlanCache()
    first = cache.plan(state())
    sd = changed("non-contiguous is fine, transposed shape is not")
    assert cache.plan(sd).plan_id == first.plan_id
    staged = staged_bytes(cache, sd)
    assert torch.equal(staged[0].view(torch.float32).reshape(3, 4), sd["model"]["w"])


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
