"""Loads into the same target again: the target is bound to the manifest's plan (matched,
checked, its small tensors read straight into their memory) and found unchanged in C; any
change to it (a tensor's shape, dtype, device, memory, strides, requires_grad; keys; a leaf
replaced) is matched and checked again, as on a first load."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from aiockpt._format import loading, reading
from aiockpt._format.loading import load
from aiockpt._format.manifest import MANIFEST_NAME, TensorLeaf, decode_manifest
from aiockpt.errors import CorruptCheckpoint
from tests.test_load import DATA_FILE, FORMATS, flip_byte, save
from tests.test_load_many import many_small
from tests.writer_fixtures import assert_same, like, random_tensor

#: in training_state()'s model: a float32 tensor of shape (17,), one of shape (4, 1, 3)
T17, T413 = "t84", "t63"


def training_state() -> dict[str, Any]:
    """Many small tensors of every dtype, a large one (read on its own), an optimizer's
    nested state with plain leaves, a list and a flat tuple (``betas``)."""
    model = many_small(400)
    model[T17] = torch.linspace(-8, 8, 17)  # (converts to integers exactly)
    return {
        "model": model,
        "embedding": random_tensor(torch.float32, (300, 300), seed=1),
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(3.0), "exp_avg": random_tensor(torch.float32, (5,), 2)},
                1: {"step": torch.tensor(3.0), "exp_avg": random_tensor(torch.bfloat16, (3, 2), 3)},
            },
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0, 1], "name": "g"}],
        },
        "step": 7,
    }


def kept_plan() -> loading._Plan:
    """Rank 0's plan of the manifest read last."""
    kept = loading._last_plans[0]
    assert kept is not None
    return kept[1][0]


def scribble(tree: Any) -> None:
    """Overwrite every tensor of ``tree`` in place (so that a load must fill it again)."""
    if isinstance(tree, torch.Tensor):
        if tree.numel() and tree.device.type == "cpu":
            with torch.no_grad():
                junk = torch.full((tree.numel() * tree.element_size(),), 1, dtype=torch.uint8)
                tree.copy_(junk.view(tree.dtype).reshape(tree.shape))
    elif isinstance(tree, dict):
        for value in tree.values():
            scribble(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            scribble(value)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threaded", [False, True])
def test_loads_into_one_target_again_bind_it_and_fill_it_every_time(
    tmp_path: Path, fmt: str, threaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if threaded:  # every file hashed in a thread, as large files are on 2 CPUs or more
        monkeypatch.setattr(reading, "_THREADED_HASH_BYTES", 0)
    before = set(threading.enumerate())
    state_dict = training_state()
    path = save(tmp_path, state_dict, fmt)
    target = like(state_dict)
    identities = [id(t) for t in target["model"].values()]
    assert load(path, target) is target
    assert_same(target, state_dict)
    assert kept_plan().bound is None  # a load done once does not pay for binding
    bound = None
    for round_ in range(4):
        scribble(target)
        target["step"] = None
        target["optimizer"]["param_groups"][0]["betas"] = (None, None)
        assert load(path, target, verify=round_ != 2) is target
        assert_same(target, state_dict)
        assert [id(t) for t in target["model"].values()] == identities
        if round_ == 0:
            bound = kept_plan().bound
            assert bound is not None and bound.scatters  # small tensors read straight in
        else:
            assert kept_plan().bound is bound, round_  # found unchanged: not bound again
    assert not set(threading.enumerate()) - before, "a thread left running"


def set_data(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any], None]:
    """A change to the target: ``target["model"][key].data = make(it)`` (the same tensor
    object, as ``module.half()`` or FSDP leave it, with other metadata or memory)."""

    def change(target: Any) -> None:
        tensor = target["model"][key]
        tensor.data = make(tensor)

    return change


def replace(key: str, value: Callable[[torch.Tensor], Any]) -> Callable[[Any], None]:
    def change(target: Any) -> None:
        target["model"][key] = value(target["model"][key])

    return change


def resize(key: str) -> Callable[[Any], None]:
    def change(target: Any) -> None:
        target["model"][key].resize_(1)

    return change


def requires_grad(key: str) -> Callable[[Any], None]:
    def change(target: Any) -> None:
        target["model"][key].requires_grad_()

    return change


REFUSED: dict[str, tuple[Callable[[Any], None], str]] = {
    "shape (.data)": (set_data(T17, lambda t: torch.zeros(18)), "has a tensor of shape \\[18\\]"),
    "shape (resize_)": (resize(T17), "has a tensor of shape \\[1\\]"),
    "device (meta)": (replace(T17, lambda t: torch.empty(17, device="meta")), "meta device"),
    "a key the checkpoint lacks": (
        lambda target: target["model"].__setitem__("nope", torch.zeros(1)),
        "is not in the checkpoint",
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("change", list(REFUSED))
def test_a_bound_target_changed_so_that_it_no_longer_fits_is_refused_naming_the_key(
    tmp_path: Path, fmt: str, change: str
) -> None:
    """The cache never skips a check a load needs: a tensor that changed shape (through
    ``.data`` or ``resize_``, the same object) or device, or a key added, is refused with
    the error a first load gives, naming the key."""
    state_dict = training_state()
    path = save(tmp_path, state_dict, fmt)
    target = like(state_dict)
    for _ in range(3):  # bound on the second, found unchanged on the third
        load(path, target)
    assert kept_plan().bound is not None
    apply, message = REFUSED[change]
    apply(target)
    key = "model.nope" if change == "a key the checkpoint lacks" else "model." + T17
    with pytest.raises((ValueError, KeyError), match=message) as info:
        load(path, target)
    assert repr(key) in str(info.value)


CHECKED: dict[str, Callable[[Any], None]] = {
    "dtype (.data)": set_data(T17, lambda t: torch.zeros(17, dtype=torch.float64)),
    "memory (.data)": set_data(T17, lambda t: torch.zeros(17)),
    "strides (.data)": set_data(T413, lambda t: torch.zeros(3, 1, 4).permute(2, 1, 0)),
    # The same memory (same address) seen otherwise: only the guard tells them apart.
    "dtype (same memory)": set_data(T17, lambda t: t.view(torch.int32)),
    "strides (same memory)": set_data(T413, lambda t: t.as_strided((4, 1, 3), (1, 1, 4))),
    "requires_grad": requires_grad(T17),
    "another tensor object": replace(T17, lambda t: torch.zeros(17)),
    "a parameter": replace(T17, lambda t: torch.nn.Parameter(torch.zeros(17))),
    "a tensor replaced by None": replace(T17, lambda t: None),
    "a key removed": lambda target: target["model"].__delitem__(T17),
    "a plain leaf now a tensor": lambda target: target.__setitem__("step", torch.zeros(2)),
    "a tuple now holding a tensor": lambda target: target["optimizer"]["param_groups"][
        0
    ].__setitem__("betas", (torch.zeros(1), None)),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("change", list(CHECKED))
def test_a_bound_target_changed_is_matched_and_checked_again(
    tmp_path: Path, fmt: str, change: str
) -> None:
    """A bound target changed in a way a load accepts is loaded as a first load loads it:
    another dtype converted, another memory or strides filled (also where the tensor's
    address stayed: its memory seen as another dtype or with other strides), a tensor that
    requires grad filled without autograd, a new tensor object filled, None replaced, a
    removed key not read; a plain leaf that became a tensor or a tuple now holding one
    replaced."""
    state_dict = training_state()
    path = save(tmp_path, state_dict, fmt)
    target = like(state_dict)
    for _ in range(3):
        load(path, target)
    assert kept_plan().bound is not None
    CHECKED[change](target)
    expected = state_dict["model"][T17]
    held = target["model"].get(T17)
    for _ in range(3):  # and again: bound anew to the changed target, still right
        scribble(target)
        assert load(path, target) is target
        model = target["model"]
        if change == "dtype (.data)":
            assert model[T17].dtype == torch.float64
            assert torch.equal(model[T17], expected.to(torch.float64))
        elif change == "dtype (same memory)":  # converted, not the float's bits
            assert torch.equal(model[T17], expected.to(torch.int32))
        elif change == "requires_grad":
            assert model[T17].requires_grad
            assert torch.equal(model[T17].detach(), expected)
        elif change == "a key removed":
            assert T17 not in model
        elif change == "a parameter":
            assert isinstance(model[T17], torch.nn.Parameter)
            assert torch.equal(model[T17].detach(), expected)
        else:
            assert_same(model[T17], expected)
        if held is not None:
            assert model[T17] is held  # filled in place, not replaced
        rest = {k: v for k, v in state_dict["model"].items() if k != T17}
        assert_same({k: model[k].contiguous() for k in rest}, rest)
        assert_same(target["embedding"], state_dict["embedding"])
        assert target["step"] == 7 and type(target["step"]) is int
        assert target["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_a_module_state_dict_made_anew_for_each_load_is_found_unchanged(
    tmp_path: Path,
) -> None:
    """``load(path, model.state_dict())`` makes new tensor objects (detached views) every
    time: they are the same tensors at the same addresses, so the load stays bound; after
    ``model.half()`` (the same parameters, new memory and dtype) the load converts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(40)])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path = save(tmp_path, saved, "dcp")
    for parameter in model.parameters():
        torch.nn.init.zeros_(parameter)
    load(path, model.state_dict())
    load(path, model.state_dict())
    bound = kept_plan().bound
    assert bound is not None
    for _ in range(2):
        for parameter in model.parameters():
            torch.nn.init.zeros_(parameter)
        load(path, model.state_dict())
        assert kept_plan().bound is bound
        assert_same({k: v.detach() for k, v in model.state_dict().items()}, saved)
    model.half()
    load(path, model.state_dict())
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float16
        assert torch.equal(value, saved[key].half())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threaded", [False, True])
def test_a_bound_load_still_verifies_every_byte(
    tmp_path: Path, fmt: str, threaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte flipped inside a small tensor (read straight into the target) or between two
    of them (read into the gap buffer) after the target was bound is caught, naming the
    file, by the bound load."""
    if threaded:
        monkeypatch.setattr(reading, "_THREADED_HASH_BYTES", 0)
    state_dict = training_state()
    path = save(tmp_path, state_dict, fmt)
    manifest = decode_manifest((path / MANIFEST_NAME).read_bytes())
    leaf = manifest.leaves[0]
    leaves = sorted(
        (x for x in manifest.leaves if isinstance(x, TensorLeaf) and x.shape == [17]),
        key=lambda x: x.offset,
    )
    assert isinstance(leaf, TensorLeaf) and len(leaves) > 2
    inside = leaves[1].offset + 3
    between = leaves[1].offset - 1  # the byte before it (a zip header, or the one before)
    target = like(state_dict)
    for offset in (inside, between):
        for _ in range(3):
            load(path, target)
        bound = kept_plan().bound
        assert bound is not None
        flip_byte(path / DATA_FILE[fmt], offset)
        with pytest.raises(CorruptCheckpoint, match="xxh3_64") as info:
            load(path, target)
        assert info.value.path == str(path / DATA_FILE[fmt])
        assert kept_plan().bound is bound  # the bound load found it
        flip_byte(path / DATA_FILE[fmt], offset)  # restored


@pytest.mark.parametrize("fmt", FORMATS)
def test_runs_read_while_the_last_is_hashed_take_two_gap_buffers_in_turn(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bound load of many runs hashed in a thread reads each run while the one before is
    hashed: runs take two gap buffers in turn, and a buffer is read into again only once its
    last run is hashed (else the digest would take bytes of the next run and the load fail).
    A byte flipped in the last run (between two of its tensors, in DCP's framing, or in its
    last tensor) is still caught."""
    monkeypatch.setattr(reading, "_THREADED_HASH_BYTES", 0)
    monkeypatch.setattr(loading, "_RUN_BYTES", 2048)  # runs of a few tensors each
    state_dict = {"model": many_small(400)}
    path = save(tmp_path, state_dict, fmt)
    target = like(state_dict)
    for _ in range(2):
        load(path, target)
    bound = kept_plan().bound
    assert bound is not None and len(bound.scatters) >= 4
    owners = [bound.scatters[number].owner for number in sorted(bound.scatters)]
    assert len({id(owner) for owner in owners}) == 2
    assert all(a is not b for a, b in itertools.pairwise(owners))
    for _ in range(3):
        scribble(target)
        assert load(path, target) is target
        assert_same(target, state_dict)
    assert kept_plan().bound is bound
    last = max(bound.scatters)
    run = next(run for runs in bound.runs.values() for run in runs if run.number == last)
    gaps, sizes = loading._layout(run)
    offsets = [run.end - 1]
    if fmt == "dcp":
        assert gaps[1] > 0, "DCP's framing between the last run's first two tensors"
        offsets.append(run.offset + gaps[0] + sizes[0] + gaps[1] - 1)
    for offset in offsets:
        flip_byte(path / DATA_FILE[fmt], offset)
        with pytest.raises(CorruptCheckpoint, match="xxh3_64"):
            load(path, target)
        assert kept_plan().bound is bound  # the bound load found it
        flip_byte(path / DATA_FILE[fmt], offset)  # restored
    assert kept_plan().bound is bound  # the bound load found it


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_next_checkpoint_of_the_same_state_takes_over_the_plan_and_the_bound_target(
    tmp_path: Path, fmt: str
) -> None:
    """An eval polling for new checkpoints loads each into one model: a checkpoint laid out
    as the one before (other tensor values, another step count) takes over its plan and
    the target bound to it; one laid out otherwise gets its own plan. Each load gives its
    own checkpoint's values."""
    state_dict = training_state()
    target = like(state_dict)
    first = save(tmp_path, state_dict, fmt, name="first")
    for _ in range(3):
        load(first, target)
    plan = kept_plan()
    bound = plan.bound
    assert bound is not None
    later = training_state()
    later["model"] = {k: v.clone() for k, v in later["model"].items()}
    later["model"][T17] = torch.linspace(0, 1, 17)
    later["embedding"] = random_tensor(torch.float32, (300, 300), seed=77)
    later["step"] = 8
    second = save(tmp_path, later, fmt, name="second")
    assert (second / MANIFEST_NAME).read_bytes() != (first / MANIFEST_NAME).read_bytes()
    scribble(target)
    assert load(second, target) is target
    assert_same(target, later)
    assert kept_plan() is plan and plan.bound is bound  # taken over, found unchanged
    moved = dict(later, extra=torch.ones(3))  # another layout (one more tensor)
    third = save(tmp_path, moved, fmt, name="third")
    scribble(target)
    assert load(third, target) is target
    assert_same(target, later)
    assert kept_plan() is not plan
    assert load(first, like(state_dict)) is not None  # back to the first: planned again
    assert kept_plan() is not plan


def test_small_tensors_overlapped_by_a_large_one_are_still_read_into_a_bound_target(
    tmp_path: Path,
) -> None:
    """A manifest (sealed with a valid checksum) whose large tensor reaches into the small
    ones after it: the run of small tensors starts before the end of what was read already;
    a bound load still reads every small tensor into the target and hashes each byte once."""
    from tests.test_hostile_input import sealed

    small = {f"s{i}": torch.full((16,), float(i)) for i in range(8)}
    state_dict = {"big": torch.arange(90_000, dtype=torch.float32), **small}
    path = save(tmp_path, state_dict, "safetensors")
    manifest = json.loads((path / MANIFEST_NAME).read_bytes())
    skeleton = manifest["skeleton"]
    index = {key: child[1] for key, child in zip(skeleton[1], skeleton[2], strict=True)}
    big = manifest["leaves"][index["big"]]
    after = [manifest["leaves"][index[k]] for k in small]
    first = min(
        (leaf for leaf in after if leaf["offset"] > big["offset"]), key=lambda x: x["offset"]
    )
    assert first["offset"] == big["offset"] + 90_000 * 4  # (laid out one after the other)
    big["shape"] = [90_040]  # 160 bytes more: over the first small tensors
    (path / MANIFEST_NAME).write_bytes(sealed(manifest))
    target = like(state_dict)
    target["big"] = torch.zeros(90_040)
    for round_ in range(4):
        scribble(target)
        assert load(path, target) is target
        assert_same({k: target[k] for k in small}, small)
        assert torch.equal(target["big"][:90_000], state_dict["big"])
        if round_ >= 1:
            bound = kept_plan().bound
            assert bound is not None and bound.scatters, round_


def test_a_bound_target_is_not_kept_alive_by_the_plan(tmp_path: Path) -> None:
    """The plan keeps what it checks a target against, never the target: a model dropped
    after its loads is freed at once (reference counting, no collection needed), and a new
    one loads right (at the old addresses too, if the allocator gives them back)."""
    import weakref

    state_dict = training_state()
    path = save(tmp_path, state_dict, "dcp")
    target = like(state_dict)
    for _ in range(3):
        load(path, target)
    assert kept_plan().bound is not None
    watched = [weakref.ref(t) for t in target["model"].values()]
    del target
    assert not any(ref() is not None for ref in watched)
    again = like(state_dict)
    for _ in range(3):
        scribble(again)
        assert load(path, again) is again
        assert_same(again, state_dict)


def test_a_key_of_a_bound_target_replaced_by_a_tensor_is_refused_as_on_a_first_load(
    tmp_path: Path,
) -> None:
    """Keys are compared as lists: a key whose == raises (a tensor) sends the load back to
    matching, which names the key the checkpoint lacks."""
    state_dict = {"state": {0: torch.ones(3), 1: torch.zeros(2)}}
    path = save(tmp_path, state_dict, "dcp")
    target = like(state_dict)
    for _ in range(3):
        load(path, target)
    assert kept_plan().bound is not None
    with pytest.raises(RuntimeError):  # (a tensor of two elements == 0 is ambiguous)
        bool([torch.ones(2), 1] == [0, 1])
    odd: dict[Any, Any] = {torch.ones(2): torch.zeros(3), 1: target["state"][1]}
    with pytest.raises(KeyError, match="is not in the checkpoint"):
        load(path, {"state": odd})
