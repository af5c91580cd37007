"""The generic path: any module whose ``forward`` calls ``torch.nn.functional.scaled_dot_product_attention``.

Hand-written DiTs (the original Wan repository's ``WanSelfAttention``, demo models) call SDPA themselves,
in ``forward`` or in ``self.<helper>`` methods up to :data:`HELPER_DEPTH` calls below it.

* **Find**: the bytecode names of ``forward`` and the helpers it calls (no source text needed: works for
  ``exec``-made classes and ``.pyc``-only installs).
* **Classify**: cross when the attribute or class name says so; otherwise self, and each call is classified
  again from its shapes: query and key lengths, and a layer given text tokens (``encoder_hidden_states``,
  ``context``, ...: :data:`~litepatch.adapters.base.ENCODER_NAMES`) whose attention sequence holds both
  streams is joint, its text tokens protected at both ends of the sequence unless the module says where
  they are (an attribute ``text_layout = "first"`` or ``"last"``).
* **Intercept**: copies of the methods that call SDPA, with ``F``/``scaled_dot_product_attention`` naming the
  layer's interceptor; SDPA reached any other way (an import inside the function) gets the
  ``TorchFunctionMode`` fallback.
"""

from __future__ import annotations

import torch

from .base import SDPA_NAME, Adapter, code_names, methods_reaching

HELPER_DEPTH = 3


def calls_sdpa(module: torch.nn.Module) -> bool:
    """Whether ``type(module).forward`` reaches SDPA, itself or through its class's methods."""
    return bool(methods_reaching(type(module), lambda f: SDPA_NAME in code_names(f), HELPER_DEPTH))


class SDPACallerAdapter(Adapter):
    """Modules that call SDPA themselves (see the module docstring)."""

    name = "sdpa-call"

    def matches(self, module: torch.nn.Module, name: str) -> bool:
        return calls_sdpa(module)
