"""YAML with positions: load a document, refuse duplicate keys, remember where each value is.

PyYAML silently keeps the last of two equal keys; this loader refuses them. It
also returns a table from each value's path (``("plugins", "spf", "fail")``) to
its line and column, so that a validation error can name ``FILE:LINE:COL``.

A policy file is input too, and bounded like any other (each limit is a
``FILE:LINE:COL`` error, found in well under a second):

- at most :data:`MAX_POLICY_BYTES` (1 MiB), checked before the file is read;
- nesting at most :data:`MAX_DEPTH` (64) levels deep;
- aliases (``*name``) may add at most :data:`MAX_ALIAS_NODES` (10,000) nodes
  to the document in all, counted as the document is composed, so an alias
  bomb ("billion laughs") is refused at the alias that crosses the bound;
  an alias inside its own anchor is refused too;
- an integer has at most :data:`MAX_INT_DIGITS` (64) digits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Position:
    """A 1-based line and column in a file."""

    line: int
    column: int


MAX_POLICY_BYTES = 1024 * 1024
"""The largest policy file read, in bytes."""
MAX_DEPTH = 64
"""The deepest nesting of mappings and sequences."""
MAX_ALIAS_NODES = 10_000
"""How many nodes aliases may add to a document, all aliases together."""
MAX_INT_DIGITS = 64
"""The longest integer literal."""


class SourceError(Exception):
    """One or more problems in a policy file, each as ``FILE:LINE:COL: path: message``."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


Path = tuple[str | int, ...]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys and reads booleans as YAML 1.2 does.

    YAML 1.1 reads unquoted ``on``, ``off``, ``yes``, ``no`` as booleans, so
    ``mode: off`` would arrive as ``False``. Here only ``true`` and ``false``
    are booleans; everything else is the string it looks like.

    It also enforces :data:`MAX_DEPTH` and :data:`MAX_ALIAS_NODES` while
    composing: each node's size (its nodes, aliases expanded) is computed
    once, when it is complete, and an alias adds its target's size.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> nodes in it, aliases expanded
        self._alias_nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose one node, counting depth and what aliases expand to."""
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise _composer_error(f"alias *{event.anchor} refers to itself", event)
            self._alias_nodes += size
            if self._alias_nodes > MAX_ALIAS_NODES:
                message = f"aliases expand to more than {MAX_ALIAS_NODES} nodes (alias bomb?)"
                raise _composer_error(message, event)
            return node
        collection = isinstance(event, yaml.CollectionStartEvent)
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _composer_error(f"nested more than {MAX_DEPTH} levels deep", event)
        try:
            node = super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1
        if node is not None:
            children = _children(node)
            self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in children)
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer, refusing literals longer than :data:`MAX_INT_DIGITS`."""
        if len(str(node.value)) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer longer than {MAX_INT_DIGITS} digits", node.start_mark
            )
        value: int = super().construct_yaml_int(node)
        return value

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """Construct a value; a value its tag cannot read (``!!int abc``) is a marked error."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"cannot read this {node.tag.rpartition(':')[2]}: {exc}",
                node.start_mark,
            ) from None


def _composer_error(problem: str, event: yaml.Event) -> yaml.composer.ComposerError:
    mark: Any = event.start_mark
    return yaml.composer.ComposerError(None, None, problem, mark)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            )
        if key in seen:
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first defined at line {first})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _walk(node: yaml.Node, path: Path, marks: dict[Path, Position]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            # Point at the key: "unknown key" and "wrong type" both read best there.
            marks[child] = Position(key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _walk(value_node, child, marks)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            marks[child] = Position(item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, child, marks)


@dataclass(frozen=True, slots=True)
class Document:
    """A loaded YAML document and where each of its values came from."""

    filename: str
    data: Any
    marks: dict[Path, Position]

    def where(self, path: Path) -> Position:
        """The position of ``path``, or of its nearest ancestor that has one."""
        while path:
            if path in self.marks:
                return self.marks[path]
            path = path[:-1]
        return Position(1, 1)

    def error(self, path: Path, message: str) -> str:
        """Format one error as ``FILE:LINE:COL: dotted.path: message``."""
        pos = self.where(path)
        dotted = ".".join(str(p) for p in path) or "(top level)"
        return f"{self.filename}:{pos.line}:{pos.column}: {dotted}: {message}"


def _resolve_env(value: Any, path: Path, doc_errors: list[tuple[Path, str]]) -> Any:
    """Replace ``{env: NAME}`` with the environment variable's value."""
    if isinstance(value, dict):
        if set(value) == {"env"} and isinstance(value["env"], str):
            name = value["env"]
            if name not in os.environ:
                doc_errors.append((path, f"environment variable {name} is not set"))
                return ""
            return os.environ[name]
        return {k: _resolve_env(v, (*path, k), doc_errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_env(v, (*path, i), doc_errors) for i, v in enumerate(value)]
    return value


def load(text: str, filename: str) -> Document:
    """Parse ``text``; raise :class:`SourceError` on bad YAML, duplicate keys or unset secrets."""
    if len(text) > MAX_POLICY_BYTES:
        raise SourceError([f"{filename}:1:1: policy is larger than {MAX_POLICY_BYTES} bytes"])
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or str(exc)
        if exc.context and "duplicate" not in problem:
            problem = f"{exc.context}: {problem}"
        raise SourceError([f"{filename}:{line}:{col}: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise SourceError([f"{filename}:1:1: {exc}"]) from None
    except RecursionError:  # a backstop: MAX_DEPTH keeps the composer well short of it
        raise SourceError([f"{filename}:1:1: nested too deeply"]) from None
    finally:
        loader.dispose()
    marks: dict[Path, Position] = {}
    if node is not None:
        _walk(node, (), marks)
    doc = Document(filename, {}, marks)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SourceError([doc.error((), "expected a mapping of policy keys at the top level")])
    env_errors: list[tuple[Path, str]] = []
    data = _resolve_env(data, (), env_errors)
    if env_errors:
        raise SourceError([doc.error(p, m) for p, m in env_errors])
    return Document(filename, data, marks)


def load_file(path: str) -> Document:
    """Read and parse a policy file; a missing or unreadable file is a :class:`SourceError`."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)  # a policy is small: never read a huge file
    except OSError as exc:
        raise SourceError([f"{path}: cannot read policy: {exc.strerror}"]) from None
    if len(raw) > MAX_POLICY_BYTES:
        limit = f"{MAX_POLICY_BYTES // 1024} KiB"
        raise SourceError([f"{path}:1:1: policy file is larger than {limit}; refused"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SourceError([f"{path}:{line}:{column}: policy is not UTF-8: {exc.reason}"]) from None
    return load(text, path)
