"""Getting the user's objects to the workers: user modules travel by value, and unpicklable parts are named."""

from __future__ import annotations

import inspect
import os
import sys
import sysconfig
import types
from typing import Any

import ray.cloudpickle as cloudpickle

_LIBRARY_DIRS = tuple(os.path.realpath(p) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                                    sysconfig.get_paths()["stdlib"]})
_REGISTERED: set[str] = set()


def _module_of(obj: Any) -> types.ModuleType | None:
    target = obj if isinstance(obj, (type, types.FunctionType, types.MethodType)) else type(obj)
    if isinstance(obj, types.MethodType):
        target = obj.__func__
    if isinstance(obj, __import__("functools").partial):
        target = obj.func
    return sys.modules.get(getattr(target, "__module__", None) or "")


def _is_user_module(module: types.ModuleType) -> bool:
    """A module of the user's own code (a script or test module), not an installed library."""
    if module.__name__ == "__main__" or module.__name__.split(".")[0] in ("raytrainer", "actors"):
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False
    path = os.path.realpath(path)
    return not path.startswith(_LIBRARY_DIRS)


def register_user_modules(objects: list[Any]) -> None:
    """Make classes/functions from the user's own modules pickle by value, so workers need no import path.

    Covers the objects themselves, the classes of a model's submodules, and the module of a dataset's class.
    """
    candidates = []
    for obj in objects:
        if obj is None:
            continue
        candidates.append(obj)
        if hasattr(obj, "modules") and callable(obj.modules):
            try:
                candidates.extend(type(m) for m in obj.modules())
            except TypeError:
                pass
        candidates.extend(type(c) for c in type(obj).__mro__[1:2] if not isinstance(obj, type))
    for candidate in candidates:
        module = _module_of(candidate)
        if module is not None and module.__name__ not in _REGISTERED and _is_user_module(module):
            cloudpickle.register_pickle_by_value(module)
            _REGISTERED.add(module.__name__)


def check_picklable(components: dict[str, Any]) -> None:
    """Raise a clear error naming the first component that cannot be sent to the workers."""
    for name, value in components.items():
        if value is None:
            continue
        try:
            cloudpickle.dumps(value)
        except Exception as error:  # noqa: BLE001 - any pickling failure is reported the same way
            hint = "define it at module level (not inside a function holding locks, files or sockets)"
            if inspect.isclass(type(value)) and hasattr(value, "__dict__"):
                hint += ", and keep unpicklable attributes (open files, locks, clients) out of it"
            raise TypeError(
                f"The Trainer's `{name}` ({type(value).__name__}) cannot be serialized to send it to the Ray "
                f"workers: {error}. Make it picklable: {hint}."
            ) from error
