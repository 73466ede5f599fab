"""Stage handlers: one module per method, registered by the recipe's ``method`` name.

A handler has three steps around the shared training engine::

    model = prepare(model, cfg, ctx)   # structure changes (masks, quantizers); calibration
    metrics = run(model, cfg, ctx)     # training with edgec.engine.fit (may be a no-op)
    model = convert(model, cfg, ctx)   # finalise (apply masks, freeze ranges)

``prepare`` must be deterministic in structure, because ``edgec export`` rebuilds a run's model
by replaying the prepares with ``ctx.rebuild=True`` and then loading the saved state.
"""
from __future__ import annotations

from edgec.registry import Registry
from edgec.stages.base import Handler, StageContext

HANDLERS: Registry[Handler] = Registry("stage method")


def get_handler(method: str) -> Handler:
    if method not in HANDLERS:
        from edgec.stages import eed, pqk, prune, psg, ptq, qat, qkd, train  # noqa: F401  (registration side effects)

    return HANDLERS.get(method)


__all__ = ["HANDLERS", "Handler", "StageContext", "get_handler"]
