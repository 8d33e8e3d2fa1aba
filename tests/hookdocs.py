"""docs/hooks.md's hook reference, generated from the hookspec docstrings (gateway/hookspecs.py).

``python -m tests.hookdocs`` rewrites the part of docs/hooks.md between the
markers; ``tests/test_docs.py`` fails when the page and the docstrings differ.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from mailgate import hookspecs
from mailgate.registry import EVENTS, STAGES

HOOKS_MD = Path(__file__).parent.parent / "docs" / "hooks.md"
BEGIN = "<!-- hooks: generated from gateway/hookspecs.py by python -m tests.hookdocs -->"
END = "<!-- hooks: end -->"
GROUPS = (
    ("Lifecycle", ("on_startup", "on_shutdown")),
    ("Stages", STAGES),
    ("Events", EVENTS[2:]),
)


def _markdown(text: str) -> str:
    """reST inline markup as Markdown: ``x`` -> `x`, :class:`~a.B` -> `B`."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    return text.replace("``", "`")


def _section(name: str) -> str:
    func = getattr(hookspecs, name)
    args = ", ".join(inspect.signature(func).parameters)
    doc = inspect.cleandoc(func.__doc__ or "")
    summary, _, rest = doc.partition("\n\n")
    body: list[str] = [" ".join(summary.split())]
    fields: list[str] = []
    for para in rest.split("\n\n") if rest else []:
        if para.startswith(":"):
            for item in re.split(r"\n(?=:)", para):
                match = re.match(r":(param (\w+)|return):\s*(.*)", item, re.S)
                assert match, item
                label = f"`{match.group(2)}`" if match.group(2) else "returns"
                fields.append(f"- {label}: {' '.join(match.group(3).split())}")
        else:
            body.append(" ".join(para.split()))
    parts = [f"### {name}({args})", *body]
    if fields:
        parts.append("\n".join(fields))
    return _markdown("\n\n".join(parts))


def render() -> str:
    """The generated reference: one section per hook, grouped as the spec module groups them."""
    out = []
    for title, names in GROUPS:
        out.append(f"## {title}")
        out.extend(_section(name) for name in names)
    return "\n\n".join(out)


def current() -> str:
    """The generated part of docs/hooks.md as it is now."""
    text = HOOKS_MD.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def main() -> None:
    """Rewrite the generated part of docs/hooks.md."""
    text = HOOKS_MD.read_text()
    head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
    HOOKS_MD.write_text(f"{head}\n\n{render()}\n\n{tail}")


if __name__ == "__main__":
    main()
