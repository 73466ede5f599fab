"""Bounded YAML for recipes: a size limit, a nesting-depth limit and an alias-expansion limit.

Recipes are small, hand-written files; YAML anchors/aliases are allowed (``&defaults`` / ``*defaults``)
but the document they expand to is bounded, so a "billion laughs" file is refused at once instead of
growing to gigabytes in validation (which walks, and messages which print, the expanded value).
Every problem is a :class:`edgec.errors.RecipeError` (exit 2) quoting at most a short excerpt.
"""
from __future__ import annotations

import reprlib
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from edgec.errors import RecipeError

MAX_BYTES = 1 << 20  # 1 MiB: the largest shipped recipe is a few KB
MAX_DEPTH = 64  # nesting of mappings/sequences
MAX_NODES = 100_000  # scalars + collections after expanding every alias
EXCERPT_CHARS = 80

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxstring, _repr.maxother = 3, 4, 4, 40, 40
_repr.maxlong = 40


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short ``repr`` of ``value`` (never expands a huge or deeply shared structure)."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails is shown by its type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses documents nested deeper than ``MAX_DEPTH``."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML's hook
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise RecipeError(f"nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}, "
                                  f"column {mark.column + 1}", hint="a recipe is a few levels of mappings and lists")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):  # noqa: D401 - PyYAML's hook
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. an integer of 10,000 digits
            mark = node.start_mark
            raise RecipeError(f"a value at line {mark.line + 1}, column {mark.column + 1} cannot be converted "
                              f"({type(exc).__name__}: {clip(str(exc).split(';')[0], 120)})") from None


def _expanded_size(root: Node) -> int:
    """Nodes of the document with every alias expanded (memoised per node: linear in the file);
    ``MAX_NODES + 1`` for a recursive alias (``&a [*a]``), which expands without end."""
    memo: dict[int, int] = {}
    open_: set[int] = set()  # on the current path: met again = a cycle
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            open_.discard(id(node))
            memo[id(node)] = min(1 + sum(memo[id(c)] for c in children), MAX_NODES + 1)
            continue
        if id(node) in memo:
            continue
        if id(node) in open_ or any(id(c) in open_ or c is node for c in children):
            return MAX_NODES + 1
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in memo)
    return memo[id(root)]


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def load_text(text: str, label: str) -> Any:
    """Parse one YAML document within the limits; RecipeError (naming ``label``) otherwise."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader checks the characters here already
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise RecipeError(f"recipe {label} expands to more than {MAX_NODES:,} values (YAML aliases "
                              "referring to aliases, or to themselves: a 'billion laughs' document)",
                              hint="write the recipe out without nested anchors/aliases")
        return loader.construct_document(node)
    except RecipeError as exc:
        if exc.message.startswith("recipe "):
            raise
        raise RecipeError(f"recipe {label} is not a valid recipe: {exc.message}", hint=exc.hint) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"recipe {label} is not valid YAML{_where(exc)}: {clip(problem, 200)}") from None
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:  # e.g. an int of 10,000 digits
        raise RecipeError(f"recipe {label} holds a value YAML cannot convert ({type(exc).__name__}: "
                          f"{clip(exc, 120)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path, label: str) -> str:
    """A recipe file's text: at most ``MAX_BYTES`` read, strict UTF-8; RecipeError otherwise."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)  # never more than the limit into memory
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {label}: {exc.strerror or exc}") from None
    return decode(raw, label)


def decode(raw: bytes, label: str) -> str:
    """Size limit and strict UTF-8."""
    if len(raw) > MAX_BYTES:
        raise RecipeError(f"recipe {label} is {len(raw):,} bytes; recipes are limited to {MAX_BYTES:,} bytes",
                          hint="a recipe is a short YAML file of stages and settings")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {label} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})",
                          hint="save the recipe as UTF-8 (a YAML text file)") from None


def load_file(path, label: str) -> Any:
    """:func:`read_text` then :func:`load_text`."""
    return load_text(read_text(path, label), label)
