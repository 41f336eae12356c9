"""Record what patching replaces and restore exactly that (as tomesd's ``remove_patch`` and diffusers'
``set_processor`` do).

Every change an adapter makes to a model goes through one :class:`Patcher`: instance attributes (including
``forward``), forward hooks and pre-hooks. ``restore`` undoes them in reverse order: an attribute that existed on
the instance before gets its old value back, one that did not is deleted, and hooks are removed. Nothing is
rebound on a class, and nothing is left on objects the user owns.

A module whose ``forward`` is already wrapped by accelerate (``_hf_hook`` + ``_old_forward``, as
``dispatch_model`` / ``device_map="auto"`` leave it) keeps that wrapper: :meth:`Patcher.set_forward` replaces the
inner ``_old_forward`` instead, so accelerate's device hooks still run around tokenreduce's forward.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional, Tuple

import torch.nn as nn

class _Missing:
    """Marks an attribute the instance did not have (picklable: a patched model survives ``torch.save``)."""

    def __reduce__(self) -> str:
        return "_MISSING"

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


class Patcher:
    """The undo log of one patch."""

    def __init__(self) -> None:
        self._undo: List[Tuple[str, Any, str, Any]] = []  # (kind, object, attribute, previous value)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute (bypassing ``nn.Module.__setattr__``, so nothing enters ``_modules`` or
        ``_parameters``), remembering what the instance had."""
        previous = obj.__dict__.get(name, _MISSING)
        self._undo.append(("attr", obj, name, previous))
        obj.__dict__[name] = value

    def original(self, obj: Any, name: str) -> "Original":
        """What ``obj.<name>(...)`` runs now, as a callable a replacement can delegate to: accelerate's inner
        forward where it wraps the module, an instance attribute someone else set, or the class's method."""
        if name == "forward" and isinstance(obj, nn.Module) and self._accelerate_wrapped(obj):
            return Original(obj, obj.__dict__["_old_forward"], bound=True)
        if name in obj.__dict__:
            return Original(obj, obj.__dict__[name], bound=True)
        return Original(obj, getattr(type(obj), name), bound=False)

    def set_forward(self, module: nn.Module, forward: Callable) -> None:
        """Make ``module(...)`` run ``forward`` (under accelerate's hook where the module has one)."""
        self.set_attr(module, "_old_forward" if self._accelerate_wrapped(module) else "forward", forward)

    def hook(self, handle: Any) -> None:
        """Remember a hook handle (``register_forward_hook`` / ``register_forward_pre_hook``) to remove."""
        self._undo.append(("hook", handle, "", None))

    def restore(self) -> None:
        """Undo every change, newest first."""
        while self._undo:
            kind, obj, name, previous = self._undo.pop()
            if kind == "hook":
                obj.remove()
            elif previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous

    @staticmethod
    def _accelerate_wrapped(module: nn.Module) -> bool:
        return "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook") and "forward" in module.__dict__


class Original:
    """A method as it was before patching, callable like the bound method. Holds the class function (not a bound
    method) where it came from the class, so a patched model pickles and unpickles without recursion."""

    def __init__(self, obj: Any, fn: Callable, bound: bool) -> None:
        self.obj, self.fn, self.bound = obj, fn, bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs) if self.bound else self.fn(self.obj, *args, **kwargs)

    @property
    def function(self) -> Callable:
        """The underlying function."""
        return self.fn

    @property
    def __signature__(self) -> inspect.Signature:
        """The signature of the method as called (without ``self``), so code that inspects a patched method —
        transformers' ``generate`` validates its kwargs against ``forward``'s — sees the original one."""
        sig = inspect.signature(self.fn)
        if self.bound:
            return sig
        return sig.replace(parameters=list(sig.parameters.values())[1:])


class Replacement:
    """Base of the callables a patch installs in place of a method: they present the original's signature and
    docstring (as ``functools.wraps`` would) and stay picklable."""

    original: Original

    @property
    def __signature__(self) -> inspect.Signature:
        return self.original.__signature__

    @property
    def __doc__(self) -> Optional[str]:  # type: ignore[override]
        return getattr(self.original.fn, "__doc__", None)
