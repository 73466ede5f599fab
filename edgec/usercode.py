"""Import a user's code named in a spec: ``path/to/file.py`` or ``package.module``.

One importer for the model specs (:mod:`edgec.models.hub`) and the ``python:`` data specs
(:mod:`edgec.data.python`). It raises the original exceptions; each caller turns them into its
own error messages.

A file is executed as a module registered in ``sys.modules`` under a name chosen by the caller
(so pickling, ``torch.fx`` and ``deepcopy`` of classes defined there work), with the file's
folder on ``sys.path`` while it runs so it can import its sibling modules.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

__all__ = ["import_file", "import_module", "is_missing_module", "on_sys_path"]


@contextmanager
def on_sys_path(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration, unless it is on it already."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def import_file(path: Path, name: str, *, reuse: bool = False) -> ModuleType | None:
    """Execute the Python file ``path`` (resolved) as module ``name``; None when Python has no
    loader for it. ``reuse``: a module already registered under ``name`` is returned as it is
    (the same file loaded twice in one process gives the same classes). An exception raised by
    the file's code propagates, and ``name`` is unregistered again."""
    if reuse and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with on_sys_path(str(path.parent)):
            spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    return module


def import_module(name: str, *, search: str | None = None) -> ModuleType:
    """``importlib.import_module(name)``, with the folder ``search`` (if given) on ``sys.path``."""
    if search is None:
        return importlib.import_module(name)
    with on_sys_path(search):
        return importlib.import_module(name)


def is_missing_module(error: ModuleNotFoundError, name: str) -> bool:
    """Whether ``error`` says module ``name`` itself (or a parent package of it) does not exist,
    rather than a module it imports."""
    return bool(error.name) and (name == error.name or name.startswith(error.name + "."))
