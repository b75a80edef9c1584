"""User-supplied text (model names, paths, run names, recipe values) placed in slimlm's Markdown (model
cards, `slimlm report`): escaped so that a pipe, backtick, newline or HTML tag in it stays text and
never breaks a table, opens a heading or injects markup."""
from __future__ import annotations

import re


def _one_line(text) -> str:
    return " ".join(str(text).splitlines())


def text(value) -> str:
    """Plain prose or a heading: Markdown's punctuation escaped, HTML's angle brackets as entities."""
    # underscores stay: GFM never reads one inside a word (model_name, sotu_next) as emphasis
    escaped = re.sub(r"([\\`*\[\]#|])", r"\\\1", _one_line(value))
    return escaped.replace("<", "&lt;").replace(">", "&gt;")


def code(value) -> str:
    """A code span that holds any text: fenced with more backticks than the text's longest run of them;
    pipes escaped, which tables need (GFM unescapes them inside code spans too)."""
    value = _one_line(value).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if longest or value.startswith(" ") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def cell(value) -> str:
    """A table cell of plain text."""
    return text(value)
