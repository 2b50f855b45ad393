"""The user's own code on the workers: sent by value, and findable by name again once it arrives.

A script's classes (`__main__`) or a test module's are not importable on a Ray worker. cloudpickle can send them
by value (`register_pickle_by_value`), but a class rebuilt that way is known to nobody by name on the worker, so
plain `pickle` (what `torch.save(args)` uses for `training_args.bin`) fails there: "Can't pickle <class
'__main__.MyArgs'>: attribute lookup MyArgs on __main__ failed". `make_importable` therefore puts every such
class back under its module and name on the worker (a stand-in module where the real one cannot be imported), so
a checkpoint written on a worker loads on the driver, where the name means the user's own class.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import sysconfig
import types
from typing import Any, Iterable

import ray.cloudpickle as cloudpickle

_LIBRARY_DIRS = tuple({os.path.realpath(sysconfig.get_paths()[key]) for key in ("purelib", "platlib", "stdlib")})
_OUR_PACKAGES = ("raytrainer", "actors")
_registered: set[str] = set()


def _defining_module(obj: Any) -> types.ModuleType | None:
    """The module that defines `obj` (for an instance: its class; a bound method or partial: its function)."""
    if isinstance(obj, functools.partial):
        obj = obj.func
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    if not isinstance(obj, (type, types.FunctionType)):
        obj = type(obj)
    return sys.modules.get(getattr(obj, "__module__", None) or "")


def is_user_module(module: types.ModuleType) -> bool:
    """A module of the user's own code (a script, a test module, a package of theirs not installed in this
    environment), which Ray workers may not be able to import."""
    name = module.__name__
    if name == "__main__":
        return True
    if name.split(".")[0] in _OUR_PACKAGES:
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False
    path = os.path.realpath(path)
    folder = path  # the folder its top-level package lies in
    for _ in range(name.count(".") + 1 + os.path.basename(path).startswith("__init__.")):
        folder = os.path.dirname(folder)
    return not (path.startswith(_LIBRARY_DIRS) or _holds_distributions(folder))


@functools.cache
def _holds_distributions(folder: str) -> bool:
    """A folder of installed distributions (by their .dist-info records), also one that is none of this
    interpreter's library folders: a `pip install --target` folder on PYTHONPATH, as bench/gpu_check.sh makes."""
    try:
        return any(name.endswith(".dist-info") for name in os.listdir(folder))
    except OSError:
        return False


def _related(obj: Any) -> Iterable[Any]:
    """`obj`, its class's bases, for a model the classes of its submodules, and for a function the globals and
    closure values it uses (a `model_init` in a script that builds a model class of another user module)."""
    yield obj
    if isinstance(obj, functools.partial):
        obj = obj.func
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    if isinstance(obj, types.FunctionType):
        names = obj.__code__.co_names
        yield from (obj.__globals__[name] for name in names if name in obj.__globals__)
        for cell in obj.__closure__ or ():
            try:
                yield cell.cell_contents
            except ValueError:  # an empty cell
                pass
        return
    cls = obj if isinstance(obj, type) else type(obj)
    yield from cls.__mro__
    modules = getattr(obj, "modules", None)
    if not isinstance(obj, type) and callable(modules):
        try:
            yield from (type(module) for module in modules())
        except TypeError:
            pass


def send_by_value(objects: Iterable[Any]) -> None:
    """Make the user's modules among those defining `objects` travel by value (once per module and process)."""
    for obj in objects:
        if obj is None:
            continue
        for related in _related(obj):
            module = _defining_module(related)
            if module is None or module.__name__ in _registered or not is_user_module(module):
                continue
            if module.__name__ != "__main__":  # cloudpickle sends __main__'s definitions by value already
                cloudpickle.register_pickle_by_value(module)
            _registered.add(module.__name__)


def check_picklable(components: dict[str, Any]) -> None:
    """Raise a TypeError naming the first component that cannot be sent to the workers, and how to fix it."""
    for name, value in components.items():
        if value is None:
            continue
        try:
            cloudpickle.dumps(value)
        except Exception as error:  # noqa: BLE001 - any pickling failure is reported the same way
            hint = "define it at module level (not inside a function holding locks, files or sockets)"
            if hasattr(value, "__dict__"):
                hint += ", and keep unpicklable attributes (open files, locks, clients) out of it"
            raise TypeError(f"The Trainer's `{name}` ({type(value).__name__}) cannot be serialized to send it to the "
                            f"Ray workers: {error}. Make it picklable: {hint}.") from error


# ---------------------------------------------------------------------------------------------- on the worker
def _module_for(name: str) -> types.ModuleType:
    """The module `name` on this worker: imported when it can be, else an empty stand-in (parents included)."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not importable here: the user's code came by value
        pass
    parent, _, child = name.rpartition(".")
    module = types.ModuleType(name, "stand-in for the driver's module; its classes came by value (raytrainer)")
    if parent:
        package = _module_for(parent)
        package.__path__ = getattr(package, "__path__", [])
        setattr(package, child, module)
    sys.modules[name] = module
    return module


def _needs_a_name(cls: type) -> bool:
    """A class rebuilt by value whose module and name do not lead back to it on this worker."""
    qualname = getattr(cls, "__qualname__", "")
    if "<locals>" in qualname or "." in qualname:
        return False  # nested or local: plain pickle cannot name it anywhere
    module = sys.modules.get(cls.__module__)
    return module is None or getattr(module, qualname, None) is not cls


def make_importable(objects: Iterable[Any]) -> None:
    """Register the user's classes among (the classes of) `objects` under their module and name on this worker,
    so that plain pickle finds them by name as the driver would."""
    seen: set[int] = set()
    for obj in objects:
        if obj is None:
            continue
        for related in _related(obj):
            cls = related if isinstance(related, type) else None
            if cls is None or id(cls) in seen or cls.__module__.split(".")[0] in ("builtins", *_OUR_PACKAGES):
                continue
            seen.add(id(cls))
            if _needs_a_name(cls):  # an importable copy of the module loses to the driver's version
                setattr(_module_for(cls.__module__), cls.__qualname__, cls)
