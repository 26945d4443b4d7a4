"""Griffe extension for the API reference: docstring lines that start with ``>>>`` (doctest
examples, with their ``...`` continuation and expected output) become ``pycon`` code blocks, so
they render as code instead of Markdown (where ``[1, 2]`` on its own line reads as a link)."""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    out: list[str] = []
    inside = False
    for line in text.split("\n"):
        stripped = line.strip()
        if not inside and stripped.startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}```pycon", line]
            inside = True
        elif inside and not stripped:
            out += [f"{indent}```", line]
            inside = False
        else:
            out.append(line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
