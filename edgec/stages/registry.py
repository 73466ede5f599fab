"""The registry of stage methods: each method registers its recipe config class and its handler
together, from its own module ``edgec/stages/<method>.py``.

Adding a method = one new module here (config class + handler + ``register_stage``) and its tests:
the recipe schema's ``Stage`` union, the list of method names and the set of quantizing methods
are all read from this registry, and the modules are discovered (no list of imports to extend).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field

from edgec.registry import Registry

# modules of this package that are infrastructure, not methods
_NOT_METHODS = frozenset({"base", "config", "registry", "runner"})


@dataclass(frozen=True)
class StageMethod:
    name: str
    config: type[BaseModel]  # the recipe schema of the stage (``method: Literal[name]`` discriminates it)
    handler: Any  # edgec.stages.base.Handler: prepare / run / convert
    quantizes: bool = False  # at most one quantizing stage per recipe; export treats its output as integer


STAGES: Registry[StageMethod] = Registry("stage method")


def register_stage(name: str, config: type[BaseModel], handler: Any, *, quantizes: bool = False) -> None:
    field = config.model_fields.get("method")
    if field is None or getattr(field.annotation, "__args__", None) != (name,):
        raise TypeError(f"{config.__name__}.method must be Literal[{name!r}] to register it as {name!r}")
    STAGES.add(name, StageMethod(name, config, handler, quantizes))


_discovered = False


def discover() -> None:
    """Import every method module of ``edgec.stages`` once (registration is their import side effect)."""
    global _discovered
    if _discovered:
        return
    import edgec.stages as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"edgec.stages.{info.name}")
    _discovered = True


def get_method(name: str) -> StageMethod:
    discover()
    return STAGES.get(name)


def method_names() -> tuple[str, ...]:
    discover()
    return tuple(STAGES.names())


def quantizing_methods() -> tuple[str, ...]:
    discover()
    return tuple(n for n in STAGES.names() if STAGES.get(n).quantizes)


def stage_union() -> Any:
    """The recipe schema's ``Stage``: a union of every registered config, discriminated by ``method``."""
    discover()
    configs = tuple(STAGES.get(n).config for n in STAGES.names())
    return Annotated[Union[configs], Field(discriminator="method")]
