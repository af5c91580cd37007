"""Reversible attachment: the instance attributes litepatch sets on a module, recorded so that ``remove()``
(and ``copy.deepcopy``) take off exactly what was put on; the class of a module is never touched.

A patched module cannot be pickled (``remove()`` first) and ``copy.deepcopy`` of it gives an unpatched copy
with a warning: the copy never shares the original's states or tracker.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch


_MISSING = object()
LAYER_ATTR = "_litepatch"  # a patched attention module's LayerPatch
ROOT_ATTR = "_litepatch_root"  # a patched root module's RootPatch (a module may be both)
COPY_WARNING = ("litepatch: copy.deepcopy of a patched module gives an unpatched copy (the original stays "
                "patched, the copy shares none of its state); call litepatch.apply on the copy to patch it")
PICKLE_ERROR = ("{name} is patched by litepatch and cannot be pickled (its forward is a closure over live skip "
                "state); call handle.remove() (or litepatch.remove(model)) first, or save model.state_dict()")


class Attachment:
    """Instance attributes set on one module, recorded so they can be taken off (remove, deepcopy) exactly."""

    def __init__(self, module: torch.nn.Module):
        self._before = dict(module.__dict__)
        self.changed: dict[str, tuple[object, object]] = {}
        self.name = type(module).__name__

    def record(self, module: torch.nn.Module) -> None:
        """Notes every instance attribute that differs from before (call after installing)."""
        name = self.name

        def refuse_pickle(protocol=2):
            raise TypeError(PICKLE_ERROR.format(name=name))

        module.__dict__["__reduce_ex__"] = refuse_pickle
        module.__dict__["__deepcopy__"] = lambda memo: unpatched_deepcopy(module, memo)
        for key, value in module.__dict__.items():
            if self._before.get(key, _MISSING) is not value:
                self.changed[key] = (self._before.get(key, _MISSING), value)
        del self._before

    def take_off(self, module: torch.nn.Module) -> None:
        for key, (before, now) in self.changed.items():
            if module.__dict__.get(key, _MISSING) is now:
                _put(module, key, before)

    def put_back(self, module: torch.nn.Module) -> None:
        for key, (_, now) in self.changed.items():
            _put(module, key, now)


def _put(module: torch.nn.Module, key: str, value) -> None:
    if value is _MISSING:
        module.__dict__.pop(key, None)
    else:
        module.__dict__[key] = value


def unpatched_deepcopy(module: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """``copy.deepcopy`` of a patched module (or one holding patched layers), without litepatch, with a warning."""
    warnings.warn(COPY_WARNING, UserWarning, stacklevel=3)
    with detached(module):
        return copy.deepcopy(module, memo)


@contextmanager
def detached(module: torch.nn.Module):
    """Takes litepatch off ``module`` and its submodules for the duration (states and handles are kept)."""
    patched = []
    for m in module.modules():
        for attr in (ROOT_ATTR, LAYER_ATTR):  # a root that is also a layer: the root's patch went on last
            patch = m.__dict__.get(attr)
            if patch is not None:
                patch.take_off(m)
                patched.append((m, patch))
    try:
        yield
    finally:
        for m, patch in reversed(patched):
            patch.put_back(m)
