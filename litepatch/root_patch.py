"""The attachment of a patched root module: the forward pre-hook that tracks steps, branches and generations and
plans every layer's coming call, and the ``cache_context`` reader (diffusers names CFG branches with it).
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager

import torch

from litepatch.kernels import commits

from .attachment import ROOT_ATTR, Attachment
from .context import CallReader
from .diffusers_cp import dense_reason
from .runtime import Runtime, refuse_graph_capture


class RootPatch:
    """The attachment of a patched root module (``module._litepatch_root``, :data:`ROOT_ATTR`): step tracking
    pre-hook and ``cache_context`` reader."""

    def __init__(self, module: torch.nn.Module, runtime: Runtime, handle: object):
        self.runtime = runtime
        self.handle = handle
        self.reader = CallReader.for_forward(module.forward)
        self.hook = None
        self.post = None  # the forward hook that closes the commit window
        self.checked_parallel_config = None
        self._attachment: Attachment | None = None
        self._hook_entries: list = []

    def check_parallelism(self, module: torch.nn.Module) -> None:
        """Warns once per diffusers parallel config under which every patched layer stays dense (ring CP, ...)."""
        config = getattr(module, "_parallel_config", None)
        if config is None or config is self.checked_parallel_config:
            return
        self.checked_parallel_config = config
        reason = dense_reason(module)
        if reason is not None:
            warnings.warn(f"litepatch: {reason}", UserWarning, stacklevel=3)

    def check_reach(self) -> None:
        """Warns once per layer that ran while none of its attention calls reached litepatch."""
        for layer in self.runtime.layers.values():
            if layer.installed is not None and "replaced" not in layer.warned and not layer.installed():
                layer.warned.add("replaced")
                warnings.warn(
                    f"litepatch: {layer.name}'s attention processor was replaced after litepatch.apply "
                    "(set_processor / set_attn_processor); the layer runs dense. Set processors before apply, or "
                    "call handle.remove() and litepatch.apply(model) again",
                    UserWarning, stacklevel=4,
                )
            if layer.entered and not layer.reached and "unreached" not in layer.warned:
                layer.warned.add("unreached")
                warnings.warn(
                    f"litepatch: {layer.name} ran but none of its attention calls reached litepatch "
                    f"(interception: {layer.interception}); it runs dense. Its attention is computed outside the "
                    "call site litepatch routes (a changed processor, a fused path); see litepatch.inspect(model)",
                    UserWarning, stacklevel=4,
                )
            layer.entered = layer.reached = False

    def pre_hook(self, module, args, kwargs):
        self.check_parallelism(module)
        timestep, text_tokens, inputs = self.reader.read_source(args, kwargs)
        if isinstance(timestep, torch.Tensor):
            refuse_graph_capture(timestep)  # before anything is flushed or planned
        runtime = self.runtime
        runtime.flush()
        self.check_reach()
        runtime.text_tokens, runtime.stream_text_tokens = text_tokens, None
        runtime.start_forward(timestep, runtime.context_name, inputs)
        commits.open_window()  # the layers' commits may go out together when the forward returns (post_hook)
        return None

    def post_hook(self, module, args, kwargs, output):
        """Launches the commits the forward's layers deferred (one launch; also when the forward raised)."""
        commits.close_window()
        return None

    def install(self, module: torch.nn.Module) -> None:
        self.check_parallelism(module)
        attachment = Attachment(module)
        self.hook = module.register_forward_pre_hook(torch._dynamo.disable(self.pre_hook), with_kwargs=True)
        self.post = module.register_forward_hook(torch._dynamo.disable(self.post_hook), with_kwargs=True,
                                                 always_call=True)
        original = getattr(module, "cache_context", None)
        if callable(original):
            runtime = self.runtime

            @contextmanager
            def cache_context(name, *args, **kwargs):
                runtime.context_name = name
                try:
                    with original(name, *args, **kwargs):
                        yield
                finally:
                    runtime.context_name = None

            functools.update_wrapper(cache_context, original)
            module.__dict__["cache_context"] = cache_context
        module.__dict__[ROOT_ATTR] = self
        attachment.record(module)
        self._attachment = attachment

    def uninstall(self, module: torch.nn.Module) -> None:
        commits.flush()
        for handle in (self.hook, self.post):
            if handle is not None:
                handle.remove()
        self.hook = self.post = None
        self._attachment.take_off(module)

    def take_off(self, module: torch.nn.Module) -> None:
        self._attachment.take_off(module)
        hook_ids = {handle.id for handle in (self.hook, self.post) if handle is not None}
        self._hook_entries = []
        for hooks in (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, module._forward_hooks,
                      module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
            if hook_ids & hooks.keys():
                self._hook_entries.append((hooks, dict(hooks)))
                for hook_id in hook_ids & hooks.keys():
                    del hooks[hook_id]

    def put_back(self, module: torch.nn.Module) -> None:
        self._attachment.put_back(module)
        for hooks, saved in self._hook_entries:
            hooks.clear()
            hooks.update(saved)
        self._hook_entries = []
