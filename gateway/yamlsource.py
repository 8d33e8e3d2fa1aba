"""YAML with positions: load a document, refuse duplicate keys, remember where each value is.

PyYAML silently keeps the last of two equal keys; this loader refuses them. It
also returns a table from each value's path (``("plugins", "spf", "fail")``) to
its line and column, so that a validation error can name ``FILE:LINE:COL``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Position:
    """A 1-based line and column in a file."""

    line: int
    column: int


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
    """


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
        key = loader.construct_object(key_node)
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
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or str(exc)
        if exc.context and "duplicate" not in problem:
            problem = f"{exc.context}: {problem}"
        raise SourceError([f"{filename}:{line}:{col}: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise SourceError([f"{filename}:1:1: {exc}"]) from None
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
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise SourceError([f"{path}: cannot read policy: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise SourceError([f"{path}: policy is not UTF-8: {exc.reason}"]) from None
    return load(text, path)
