"""``Stateful`` values in a state dict, as ``torch.distributed.checkpoint`` treats them.

torch's ``Stateful`` protocol (``torch.distributed.checkpoint.stateful``) is an object with
``state_dict()`` and ``load_state_dict(sd)``: modules, optimizers, torchtitan's model and
optimizer containers, ``StatefulDataLoader``, an app state wrapping ``get_state_dict`` /
``set_state_dict``. ``dcp.save`` saves ``value.state_dict()`` in place of each such value at
the top level of the state dict; ``dcp.load`` loads into ``value.state_dict()`` and then calls
``value.load_state_dict`` with what it loaded. aiockpt does the same, and also accepts a state
dict that is itself ``Stateful`` (``save(model, ...)``).

Only the root and the values of a root dict are looked at, as in torch: walking every leaf
would cost each save of 100,000 tensors a per-leaf check, and torch's nested ``Stateful``
values are not called either. A nested one is refused by ``save`` (``TypeError`` naming its
key and saying to move it up), not pickled, unless ``allow_pickle``.

The check is structural, as ``isinstance(x, Stateful)`` is for a ``runtime_checkable``
protocol, so that this module needs no torch import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from typing import Any

__all__ = [
    "CallerState",
    "StatefulLoad",
    "is_stateful",
    "load_through_stateful",
    "stateful_to_state_dict",
]


def is_stateful(value: Any) -> bool:
    """Whether ``value`` implements torch's ``Stateful`` protocol (callable ``state_dict``
    and ``load_state_dict``). Tensors and plain containers never do."""
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


class CallerState:
    """A state dict whose ``Stateful`` values were resolved in the caller's thread.

    ``SyncCheckpointer`` resolves them in the trainer's thread (``state_dict()`` may run
    collectives on the trainer's process group, which must never run from another thread)
    and hands this to the ``Checkpointer`` in its loop thread; an error raised there is
    carried along and raised by the save, so that it still takes its place in the ranks'
    order of saves and fails on the other ranks too.
    """

    __slots__ = ("_error", "_value")

    def __init__(self, state_dict: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        try:
            self._value = stateful_to_state_dict(state_dict)
        except Exception as exc:
            self._error = exc

    def unwrap(self) -> Any:
        """The resolved state dict; raises what resolving it raised."""
        if self._error is not None:
            raise self._error
        return self._value


def stateful_to_state_dict(state_dict: Any) -> Any:
    """What to save for ``state_dict``: ``state_dict.state_dict()`` if it is ``Stateful``;
    for a dict with ``Stateful`` values, a shallow copy with ``value.state_dict()`` in their
    place (the caller's dict is left alone); otherwise ``state_dict`` itself.

    Raises what a ``state_dict()`` raises, and ``TypeError`` when one returns something
    other than a dict (naming the key).
    """
    if isinstance(state_dict, CallerState):
        return state_dict.unwrap()
    if is_stateful(state_dict):
        return _state_of(state_dict, "<root>")
    if not isinstance(state_dict, dict) or not any(
        map(is_stateful, _maybe_stateful(state_dict.values()))
    ):
        return state_dict
    return {
        key: _state_of(value, key) if is_stateful(value) else value
        for key, value in state_dict.items()
    }


def _maybe_stateful(values: Collection[Any]) -> Collection[Any]:
    """``values`` less what cannot be ``Stateful``: when every value is a tensor of a class
    without ``state_dict`` (a model's flat state dict of 20,000 tensors), none. One pass in C
    over their types, where asking each tensor for ``state_dict`` costs ~0.12 us."""
    torch = sys.modules.get("torch")  # no tensor exists before torch is imported
    if torch is None:
        return values
    tensor = torch.Tensor
    for kind in set(map(type, values)):
        if not issubclass(kind, tensor) or hasattr(kind, "state_dict"):
            return values
    return ()


def _state_of(value: Any, key: object) -> Any:
    state = value.state_dict()
    if not isinstance(state, dict):
        raise TypeError(
            f"state dict entry {key!r} is Stateful ({type(value).__qualname__}), and its "
            f"state_dict() returned a {type(state).__qualname__}, not a dict"
        )
    return state


class StatefulLoad:
    """A load into ``target`` that goes through its ``Stateful`` values as ``dcp.load``
    does, in two steps so that the file reading between them may run in another thread
    while ``state_dict()`` and ``load_state_dict()`` (which may run collectives) run in the
    caller's: ``StatefulLoad(target)`` calls each one's ``state_dict()`` into ``into``,
    the state dict to load in place; ``finish(loaded)`` gives each what was loaded with
    ``load_state_dict`` and puts the root dict's other loaded values into ``target``.

    Without ``Stateful`` values ``into`` is ``target`` itself and ``finish`` returns what
    it is given. Raises what a ``state_dict()`` or ``load_state_dict()`` raises, and
    ``TypeError`` when a ``state_dict()`` returns something other than a dict.
    """

    __slots__ = ("_stateful_keys", "into", "target")

    def __init__(self, target: Any) -> None:
        self.target = target
        self._stateful_keys: list[Any] | None = None
        if is_stateful(target):
            self.into = _state_of(target, "<root>")
        elif isinstance(target, dict) and any(map(is_stateful, target.values())):
            self._stateful_keys = [key for key, value in target.items() if is_stateful(value)]
            self.into = stateful_to_state_dict(target)
        else:
            self.into = target

    def finish(self, loaded: Any) -> Any:
        """Hand ``loaded`` (``into``, filled) to the ``Stateful`` values; return the target."""
        target = self.target
        if is_stateful(target):
            target.load_state_dict(loaded)
            return target
        if self._stateful_keys is None:
            return loaded
        for key in target:
            if key not in self._stateful_keys:
                target[key] = loaded[key]
        for key in self._stateful_keys:
            target[key].load_state_dict(loaded[key])
        return target


def load_through_stateful(target: Any, load: Callable[[Any], Any]) -> Any:
    """Run ``load`` (which fills a state dict in place and returns it) for ``target``,
    going through its ``Stateful`` values as ``dcp.load`` does (see ``StatefulLoad``);
    return ``target``, filled. Raises what ``load`` raises (no ``load_state_dict`` is
    called then), and what ``StatefulLoad`` raises."""
    stateful = StatefulLoad(target)
    return stateful.finish(load(stateful.into))
