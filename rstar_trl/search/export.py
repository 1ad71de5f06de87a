"""Views of one search tree for people: a text outline and a self-contained HTML page."""

from __future__ import annotations

import html

from ..format import parse_step
from .tree import Node, SearchTree


def _label(node: Node) -> str:
    step = parse_step(node.text)
    first = (step.comment or step.code or step.answer or "").strip().split("\n")[0]
    return first[:80]


def _status(node: Node) -> str:
    if not node.terminal:
        return ""
    if node.terminal_reason == "answer":
        mark = {True: "correct", False: "wrong", None: "scored"}[node.correct]
        return f" [{mark}: {node.answer}]"
    return f" [{node.terminal_reason}]"


def tree_to_outline(tree: SearchTree | str | dict, max_depth: int | None = None) -> str:
    """A readable, indented outline: one line per node with Q, N and the first line of its step."""
    tree = tree if isinstance(tree, SearchTree) else SearchTree.from_json(tree)
    lines = [f"{tree.question.strip()[:100]}  (gold: {tree.gold_answer}; Q={tree.root.Q:+.2f} N={tree.root.visits})"]

    def walk(node: Node, indent: str) -> None:
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            ppm = f" ppm={child.ppm_score:+.2f}" if child.ppm_score is not None else ""
            lines.append(
                f"{indent}{'└─' if last else '├─'} Q={child.Q:+.2f} N={child.visits}{ppm} {_label(child)}"
                f"{_status(child)}"
            )
            if max_depth is None or child.depth < max_depth:
                walk(child, indent + ("   " if last else "│  "))

    walk(tree.root, "")
    return "\n".join(lines)


def _colour(q: float) -> str:
    # Q in [-1, 1] -> red (wrong) .. yellow .. green (right)
    t = max(0.0, min(1.0, (q + 1) / 2))
    return f"hsl({int(120 * t)}, 70%, 85%)"


def tree_to_html(tree: SearchTree | str | dict, open_depth: int = 2) -> str:
    """A self-contained HTML page: nested foldable nodes (open to `open_depth`), coloured by Q."""
    tree = tree if isinstance(tree, SearchTree) else SearchTree.from_json(tree)

    def render(node: Node) -> str:
        inner = "".join(render(child) for child in node.children)
        header = (
            f"<span class='q'>Q={node.Q:+.2f} N={node.visits}</span> {html.escape(_label(node))}"
            f"<span class='st'>{html.escape(_status(node))}</span>"
        )
        body = f"<pre>{html.escape(node.text)}</pre>"
        if node.output:
            body += f"<div class='out'>output: <code>{html.escape(node.output.strip()[:300])}</code></div>"
        opened = " open" if node.depth < open_depth else ""
        return (
            f"<details{opened} style='background:{_colour(node.Q)}'><summary>{header}</summary>{body}{inner}</details>"
        )

    nodes = "".join(render(child) for child in tree.root.children)
    solved = "solved" if tree.solved else "not solved"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MCTS tree</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
details {{ margin: 3px 0 3px 1.2em; padding: 2px 6px; border-left: 2px solid #888; border-radius: 4px; }}
summary {{ cursor: pointer; }}
pre {{ margin: 4px 0; white-space: pre-wrap; font-size: 90%; }}
.q {{ font-family: monospace; font-weight: bold; }}
.st {{ font-weight: bold; }}
.out {{ font-size: 85%; color: #333; }}
</style></head><body>
<h2>{html.escape(tree.question)}</h2>
<p>Gold answer: <b>{html.escape(str(tree.gold_answer))}</b> &middot; {solved} &middot; {len(tree.nodes) - 1} nodes
&middot; root Q={tree.root.Q:+.2f}, N={tree.root.visits}. Colour: red Q=-1, green Q=+1. Click a step to fold it.</p>
{nodes}
</body></html>
"""
