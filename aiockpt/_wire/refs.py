"""Functions cross the process boundary by name, arguments as msgspec values.

Nothing is pickled: an init function or writer class travels as an import reference
``"package.module:qualified.name"`` and is imported again in the worker. Everything is checked
in the parent, where the caller can see the mistake: a lambda, a function defined inside another
function, or an argument msgspec cannot encode is a ``TypeError`` that names the value.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

__all__ = ["check_encodable", "import_ref", "resolve_ref"]

_encoder = msgspec.msgpack.Encoder()
# What msgspec raises for a value it cannot encode: an unsupported type (TypeError), an int
# beyond 64 bits (OverflowError), a str with a lone surrogate (UnicodeEncodeError, a
# ValueError).
_UNENCODABLE = (TypeError, ValueError, OverflowError, msgspec.EncodeError)


def import_ref(target: str | Callable[..., Any], what: str) -> str:
    """The import reference for ``target``, a callable or an ``"module:name"`` string.

    A callable defined in a script run as ``__main__`` is referenced by the script's path, so
    that the worker can import it as ``multiprocessing``'s spawn does (the script's top level
    runs again there, so it must be guarded by ``if __name__ == "__main__":``).

    Raises ``TypeError`` naming ``what`` for a lambda, a local function, a bound method or
    anything else that cannot be imported by name; ``ValueError`` for a malformed string.
    """
    if isinstance(target, str):
        module_name, sep, name = target.partition(":")
        if not (module_name and sep and name):
            raise ValueError(f"{what}: {target!r} is not an import reference 'module:name'")
        return target
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not callable(target) or module is None or qualname is None:
        raise TypeError(f"{what}: {target!r} is not a function or class that can be imported")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(
            f"{what}: {target!r} cannot cross the process boundary; define it at module level "
            "or pass an import reference 'module:name'"
        )
    if getattr(target, "__self__", None) is not None and not isinstance(target, type):
        raise TypeError(f"{what}: {target!r} is a bound method; pass a module-level function")
    if module == "__main__":
        module = _main_module_ref()
    elif _lookup(sys.modules.get(module), qualname) is not target:
        # e.g. a decorator replaced the name with a wrapper: the worker would import another
        # object than the one the caller passed.
        raise TypeError(f"{what}: {module}:{qualname} does not resolve back to {target!r}")
    return f"{module}:{qualname}"


def _main_module_ref() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # run as `python -m package.module`
        return str(spec.name)
    path: str | None = getattr(main, "__file__", None)
    if path is None:
        raise TypeError(
            "functions defined in an interactive session cannot cross the process boundary; "
            "define them in an importable module"
        )
    return os.path.abspath(path)


def _lookup(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def resolve_ref(ref: str) -> Any:
    """Import the object named by ``ref`` (the worker's side of ``import_ref``).

    Raises ``ImportError`` when the module or the name does not exist.
    """
    module_name, _, qualname = ref.rpartition(":")
    if module_name.endswith(".py") and os.path.isabs(module_name):
        module = _import_script(module_name)
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"{ref!r}: {module_name} has no attribute {qualname!r}") from None
    return obj


def _import_script(path: str) -> Any:
    name = "__aiockpt_main__"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the script {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def check_encodable(value: Any, what: str) -> None:
    """Raise ``TypeError`` naming the first part of ``value`` msgspec cannot encode."""
    try:
        _encoder.encode(value)
    except _UNENCODABLE:
        pass
    else:
        return
    raise TypeError(
        f"{_first_unencodable(value, what)} cannot cross the process boundary: arguments must "
        "be msgspec-encodable (None, bool, int, float, str, bytes, lists, dicts with str keys, "
        "msgspec Structs, dataclasses)"
    )


def _first_unencodable(value: Any, where: str) -> str:
    children: Sequence[tuple[str, Any]] = ()
    if isinstance(value, Mapping):
        children = [(f"{where}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        children = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    for child_where, child in children:
        try:
            _encoder.encode(child)
        except _UNENCODABLE:
            return _first_unencodable(child, child_where)
    return f"{where} = {value!r} ({type(value).__qualname__})"
