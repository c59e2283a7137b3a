"""``Stateful`` values (torch's protocol) saved through ``state_dict()`` and loaded through
``load_state_dict()``, as ``torch.distributed.checkpoint`` treats them, through every save and
load entry: ``Checkpointer``, ``SyncCheckpointer``, ``async_save``, ``aiockpt.load``."""

from __future__ import annotations

import asyncio
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

import aiockpt
from aiockpt._format.stateful import stateful_to_state_dict


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW that has stepped once (so that it has state)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


class AppState(Stateful):
    """torch's DCP tutorial's app state: model and optimizer through get/set_state_dict;
    records the threads its methods ran in (they may run collectives)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.threads: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        self.threads.append(threading.current_thread().name)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optimizer_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.threads.append(threading.current_thread().name)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


def assert_same_training_state(
    a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]
) -> None:
    for (name, x), (_, y) in zip(a[0].state_dict().items(), b[0].state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    state_a, state_b = a[1].state_dict()["state"], b[1].state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for index in state_a:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[index][key], state_b[index][key]), (index, key)


async def test_checkpointer_saves_stateful_values_and_loads_them_back(tmp_path: Path) -> None:
    """Module, optimizer and a get_state_dict app state at the top level; loading calls
    load_state_dict with what was loaded, in the caller's thread; plain values are
    replaced."""
    saved = trained(0)
    app = AppState(*trained(1))
    async with aiockpt.Checkpointer(tmp_path) as ckpt:
        await ckpt.save({"model": saved[0], "optim": saved[1], "app": app, "step": 7}, step=7)
        assert app.threads == [threading.current_thread().name]
        # What is on disk is what state_dict() returned, loadable without the objects.
        on_disk = await asyncio.to_thread(aiockpt.load, tmp_path / "step_0000000007")
        assert set(on_disk) == {"model", "optim", "app", "step"}
        assert set(on_disk["app"]) == {"model", "optim"}
        assert torch.equal(on_disk["model"]["0.weight"], saved[0][0].weight.detach())

        fresh, fresh_app = trained(2), AppState(*trained(3))
        target = {"model": fresh[0], "optim": fresh[1], "app": fresh_app, "step": 0}
        loaded = await ckpt.load_latest(target)
    assert loaded is target
    assert target["model"] is fresh[0] and target["app"] is fresh_app  # loaded in place
    assert target["step"] == 7
    assert_same_training_state(fresh, saved)
    assert_same_training_state((fresh_app.model, fresh_app.optimizer), (app.model, app.optimizer))
    # state_dict() to have something to load into, then load_state_dict(), both here.
    assert fresh_app.threads == [threading.current_thread().name] * 2


async def test_staged_means_the_stateful_objects_may_change(tmp_path: Path) -> None:
    """state_dict() is called in save itself and its tensors copied before ``staged``:
    stepping the optimizer right after does not reach the checkpoint."""
    model, optimizer = trained(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    async with aiockpt.Checkpointer(tmp_path) as ckpt:
        handle = ckpt.save({"model": model, "optim": optimizer}, step=1)
        await handle.staged
        model(torch.randn(4, 6)).square().sum().backward()
        optimizer.step()
        await handle
    loaded = await asyncio.to_thread(aiockpt.load, handle.path)
    for name, tensor in before.items():
        assert torch.equal(loaded["model"][name], tensor)
        assert not torch.equal(model.state_dict()[name], tensor)


async def test_async_save_of_a_stateful_root(tmp_path: Path) -> None:
    """The state dict may itself be Stateful (``async_save(model, path)``)."""
    model, _ = trained(0)
    await aiockpt.async_save(model, tmp_path / "model")
    fresh, _ = trained(1)
    assert await asyncio.to_thread(aiockpt.load, tmp_path / "model", fresh) is fresh
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)


async def test_a_nested_stateful_value_is_refused_naming_its_key(tmp_path: Path) -> None:
    """As in torch's DCP, only top-level values are Stateful-aware; a nested one raises at
    the call (not a worker-side pickling failure), saying what to do."""
    model, _ = trained(0)
    async with aiockpt.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=r"'outer\.model' is Stateful .* move it up"):
            ckpt.save({"outer": {"model": model}}, step=1)
        assert await ckpt.latest() is None


async def test_a_failing_state_dict_fails_the_call(tmp_path: Path) -> None:
    class Broken(Stateful):
        def state_dict(self) -> dict[str, Any]:
            raise RuntimeError("cannot gather")

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            raise AssertionError("never called")

    class NotADict(Broken):
        def state_dict(self) -> Any:
            return [1, 2]

    async with aiockpt.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(RuntimeError, match="cannot gather"):
            ckpt.save({"x": Broken()}, step=1)
        with pytest.raises(TypeError, match=r"'x' is Stateful \(.*NotADict\).* not a dict"):
            ckpt.save({"x": NotADict()}, step=2)
        await ckpt.save({"w": torch.ones(2)}, step=3)  # the next save works
        assert [c.step for c in await ckpt.checkpoints()] == [3]


def test_sync_checkpointer_calls_state_dict_and_load_state_dict_in_the_callers_thread(
    tmp_path: Path,
) -> None:
    app = AppState(*trained(0))
    caller = threading.current_thread().name
    with aiockpt.SyncCheckpointer(tmp_path) as ckpt:
        ckpt.save({"app": app, "step": 1}, step=1).result()
        fresh = AppState(*trained(1))
        target = {"app": fresh, "step": 0}
        assert ckpt.load_latest(target) is target
    assert app.threads == [caller]
    assert fresh.threads == [caller, caller]
    assert target["step"] == 1
    assert_same_training_state((fresh.model, fresh.optimizer), (app.model, app.optimizer))


def test_torch_dcp_loads_what_aiockpt_saved_from_stateful_values_and_back(
    tmp_path: Path,
) -> None:
    """The same state dict of Stateful values through both libraries, crosswise."""
    saved = AppState(*trained(0))
    with aiockpt.SyncCheckpointer(tmp_path) as ckpt:
        ckpt.save_to({"app": saved}, tmp_path / "ours").result()
    by_torch = AppState(*trained(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming a single process"
        dcp.load({"app": by_torch}, checkpoint_id=str(tmp_path / "ours"))
        dcp.save({"app": saved}, checkpoint_id=str(tmp_path / "theirs"))
    assert_same_training_state((by_torch.model, by_torch.optimizer), (saved.model, saved.optimizer))
    by_aiockpt = AppState(*trained(2))
    aiockpt.load(tmp_path / "theirs", {"app": by_aiockpt}, allow_pickle=True)
    assert_same_training_state(
        (by_aiockpt.model, by_aiockpt.optimizer), (saved.model, saved.optimizer)
    )


def test_a_failed_load_calls_no_load_state_dict(tmp_path: Path) -> None:
    model, _ = trained(0)
    with aiockpt.SyncCheckpointer(tmp_path) as ckpt:
        ckpt.save_to({"model": model}, tmp_path / "ckpt").result()
    app = AppState(*trained(1))
    with pytest.raises(KeyError, match="app"):
        aiockpt.load(tmp_path / "ckpt", {"app": app})
    assert app.threads == [threading.current_thread().name]  # state_dict() only


class StatefulTensor(torch.Tensor):
    """A tensor class that is also ``Stateful``: ``dcp.save`` calls its ``state_dict()``."""

    def state_dict(self) -> dict[str, Any]:
        return {"as_state": torch.ones(1)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def test_only_values_that_can_be_stateful_are_asked_for_state_dict() -> None:
    # A dict of plain tensors (any tensor class without state_dict) is saved as it is...
    tensors: dict[str, Any] = {"w": torch.zeros(2), "p": nn.Parameter(torch.ones(1))}
    assert stateful_to_state_dict(tensors) is tensors
    # ...but a tensor class that is Stateful, or any other Stateful among tensors, is not.
    special = torch.zeros(1).as_subclass(StatefulTensor)
    model = nn.Linear(2, 1)
    for stateful in (special, model):
        resolved = stateful_to_state_dict({**tensors, "s": stateful})
        assert resolved["w"] is tensors["w"]
        assert resolved["s"].keys() == stateful.state_dict().keys()
