"""The MCTS search tree over code-augmented steps (paper §3.2; docs/method.md).

One `SearchTree` per problem. A node is one step; the root is the problem. Each node keeps its visit count N and
value sum q, and Q = q / N. The search itself (which leaves to expand, batching across trees) lives in
`generator.py`; this module holds the per-tree rules: UCT selection, adding children, terminal rewards and
back-propagation, and the JSON schema trees are saved in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..format import Step, parse_step

# Version of the JSON written by `SearchTree.to_json`. Bump it when a field changes meaning or disappears;
# readers (`SearchTree.from_json`, the PPM data builders) refuse other versions with a clear error.
TREE_SCHEMA_VERSION = 1


@dataclass(eq=False)
class Node:
    """One step of a solution in the search tree.

    Args:
        id: index of the node in its tree (the root is 0).
        parent: the parent node (None for the root).
        text: the step as generated (and, for a final step, the executor's output block and the answer).
        depth: number of steps from the root (the root has depth 0).
        output: what the cumulative program of steps 1..depth printed.
        visits: N, the number of rollouts (or PPM initialisations) counted at this node.
        value_sum: q, the sum of the values backed up through this node.
        terminal: no children will be added (final answer, too deep, or too many failed expansions).
        terminal_reason: "answer", "max_depth" or "errors" for terminal nodes.
        answer: the extracted final answer of a final step.
        correct: for final steps graded against a gold answer: whether the answer is right.
        reward: the terminal reward (+1 / -1, or the scorer's value at test time).
        ppm_score: the process preference model's value of prefix + this step, in [-1, 1], if scored.
        failed_expansions: expansions of this node that produced no valid child in a row.
    """

    id: int
    parent: Node | None
    text: str = ""
    depth: int = 0
    output: str = ""
    visits: int = 0
    value_sum: float = 0.0
    terminal: bool = False
    terminal_reason: str | None = None
    answer: str | None = None
    correct: bool | None = None
    reward: float | None = None
    ppm_score: float | None = None
    failed_expansions: int = 0
    children: list[Node] = field(default_factory=list)

    @property
    def Q(self) -> float:  # noqa: N802 (the paper's name)
        return self.value_sum / self.visits if self.visits else 0.0

    @property
    def step(self) -> Step:
        return parse_step(self.text)

    @property
    def expanded(self) -> bool:
        return bool(self.children)

    def path(self) -> list[Node]:
        """The nodes from the first step down to this one (the root excluded)."""
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def selectable(self) -> bool:
        """Whether a rollout can still pass through or end at this node (it is not a dead end)."""
        return not self.terminal and (not self.children or any(child.selectable() for child in self.children))


class SearchTree:
    """The search tree of one problem.

    Args:
        question: the problem text.
        gold_answer: the gold final answer, or None at test time (terminal nodes are then valued by a scorer).
        c_puct: the exploration constant c of UCT.
    """

    def __init__(self, question: str, gold_answer: str | None = None, c_puct: float = 2.0):
        self.question = question
        self.gold_answer = gold_answer
        self.c_puct = c_puct
        self.root = Node(id=0, parent=None)
        self.nodes: list[Node] = [self.root]

    # -- selection ----------------------------------------------------------------------------------------

    def uct(self, node: Node) -> float:
        """UCT(s) = Q(s) + c * sqrt(ln N_parent / N(s)); unvisited nodes come first."""
        if node.visits == 0:
            return math.inf
        parent_visits = max(node.parent.visits, 1)
        return node.Q + self.c_puct * math.sqrt(math.log(parent_visits) / node.visits)

    def best_child(self, node: Node) -> Node | None:
        """The selectable child with the highest UCT (ties: the first created), or None if there is none."""
        candidates = [child for child in node.children if child.selectable()]
        return max(candidates, key=self.uct) if candidates else None

    def select_leaf(self, start: Node | None = None) -> Node | None:
        """Descend by UCT from `start` (default: the root) to a node that has not been expanded yet."""
        node = start or self.root
        if not node.selectable():
            return None
        while node.children:
            node = self.best_child(node)
        return node

    # -- growth -------------------------------------------------------------------------------------------

    def add_child(self, parent: Node, text: str, output: str = "") -> Node:
        child = Node(id=len(self.nodes), parent=parent, text=text, depth=parent.depth + 1, output=output)
        parent.children.append(child)
        self.nodes.append(child)
        return child

    def initialise_with_score(self, node: Node, score: float) -> None:
        """Eq. 3 (PPM-augmented Q): a new node starts with N = 1 and q = PPM(x + s_1..s_i)."""
        node.ppm_score = score
        node.visits = 1
        node.value_sum = score

    def backpropagate(self, node: Node, value: float) -> None:
        """Eq. 2: every node from `node` up to the root gets q += value and N += 1."""
        while node is not None:
            node.visits += 1
            node.value_sum += value
            node = node.parent

    def finish(self, node: Node, reason: str, value: float, backpropagate: bool = True) -> None:
        """Make `node` terminal, valued by its reward alone (N = 1, q = value; a PPM initialisation is replaced).

        Answers are backed up to the root (Eq. 2); dead ends (too deep, expansions that keep failing) take the
        value on that node only unless `backpropagate` is set. A terminal node has no children and no rollout has
        passed below it, so the only count it can hold before this is its own Eq. 3 initialisation."""
        node.terminal = True
        node.terminal_reason = reason
        node.reward = value
        node.visits, node.value_sum = 0, 0.0
        if backpropagate:
            self.backpropagate(node, value)
        else:
            node.visits, node.value_sum = 1, value

    # -- results ------------------------------------------------------------------------------------------

    @property
    def solved(self) -> bool:
        return any(node.correct for node in self.nodes)

    def terminal_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.terminal and node.terminal_reason == "answer"]

    def best_terminal(self) -> Node | None:
        """The answer node whose path has the highest mean Q (ties: higher min Q). Correct answers first when a
        gold answer is known; otherwise the highest reward (the scorer's value) breaks ties before Q."""

        def key(node: Node):
            qs = [n.Q for n in node.path()]
            return (bool(node.correct), node.reward or 0.0, sum(qs) / len(qs), min(qs))

        return max(self.terminal_nodes(), key=key, default=None)

    def trajectory_text(self, node: Node) -> str:
        """The solution (completion after the prompt) that ends at `node`."""
        return "".join(n.text for n in node.path())

    # -- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The tree as plain data (schema `TREE_SCHEMA_VERSION`, documented in the README)."""
        return {
            "schema_version": TREE_SCHEMA_VERSION,
            "question": self.question,
            "gold_answer": self.gold_answer,
            "c_puct": self.c_puct,
            "nodes": [
                {
                    "id": n.id,
                    "parent": None if n.parent is None else n.parent.id,
                    "text": n.text,
                    "output": n.output,
                    "depth": n.depth,
                    "visits": n.visits,
                    "q": n.value_sum,
                    "Q": n.Q,
                    "terminal": n.terminal,
                    "terminal_reason": n.terminal_reason,
                    "answer": n.answer,
                    "correct": n.correct,
                    "reward": n.reward,
                    "ppm_score": n.ppm_score,
                }
                for n in self.nodes
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | dict) -> SearchTree:
        """Rebuild a tree saved by `to_json` (any node order with parents before children)."""
        data = json.loads(data) if isinstance(data, str) else data
        version = data.get("schema_version")
        if version != TREE_SCHEMA_VERSION:
            raise ValueError(
                f"tree schema version {version!r} is not supported (this rstar_trl reads version "
                f"{TREE_SCHEMA_VERSION}); regenerate the trees with this version of MCTSGenerator"
            )
        tree = cls(data["question"], data.get("gold_answer"), data.get("c_puct", 2.0))
        tree.nodes = []
        for record in data["nodes"]:
            parent = None if record["parent"] is None else tree.nodes[record["parent"]]
            node = Node(
                id=record["id"],
                parent=parent,
                text=record["text"],
                depth=record["depth"],
                output=record["output"],
                visits=record["visits"],
                value_sum=record["q"],
                terminal=record["terminal"],
                terminal_reason=record["terminal_reason"],
                answer=record["answer"],
                correct=record["correct"],
                reward=record["reward"],
                ppm_score=record["ppm_score"],
            )
            if parent is not None:
                parent.children.append(node)
            tree.nodes.append(node)
        tree.root = tree.nodes[0]
        return tree
