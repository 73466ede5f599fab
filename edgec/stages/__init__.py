"""Stage methods: one module per method, holding its recipe config class and its handler,
registered together (:mod:`edgec.stages.registry`).

A handler has three steps around the shared training engine::

    model = prepare(model, cfg, ctx)   # structure changes (masks, quantizers); calibration
    metrics = run(model, cfg, ctx)     # training with edgec.engine.fit (may be a no-op)
    model = convert(model, cfg, ctx)   # finalise (apply masks, freeze ranges)

``prepare`` must be deterministic in structure, because ``edgec export`` rebuilds a run's model
by replaying the prepares with ``ctx.rebuild=True`` and then loading the saved state.
"""
from __future__ import annotations

from edgec.stages.registry import STAGES, get_method, method_names, quantizing_methods, register_stage


def get_handler(method: str):
    return get_method(method).handler


__all__ = ["STAGES", "get_handler", "get_method", "method_names", "quantizing_methods", "register_stage"]
