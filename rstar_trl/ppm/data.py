"""Training data from search trees (paper §3.3-3.4; docs/method.md): policy SFT data, PPM preference pairs, and the
baselines' data.

Every builder reads the trees `MCTSGenerator.generate()` returns (a `datasets.Dataset` with a `tree` column of
JSON, schema `TREE_SCHEMA_VERSION`) and returns a `datasets.Dataset` in a format TRL trains on directly:

| builder | rows | TRL columns | trains |
|---|---|---|---|
| `build_sft_dataset` | top-k correct solutions of solved problems | `prompt`, `completion` | policy (`SFTTrainer`) |
| `build_preference_pairs` | same-prefix step pairs + final steps | `prompt`, `chosen`, `rejected`, `weight` | PPM |
| `build_step_values` | steps on a path to a graded answer | `prompt`, `completion`, `label` (Q) | PQM baseline |
| `build_outcome_pairs` | correct vs wrong whole solutions | `prompt`, `chosen`, `rejected`, `weight` | ORM baseline |

Prompts are built the way the generator prompts the policy: `format_prompt(question, template)` followed by the
steps of the prefix, so `prompt + completion` (or `prompt + chosen`) is exactly the text the policy wrote after.
Only *graded* answers count as outcomes: an answer node with `correct` True or False. Nodes cut for other reasons
(too many code errors, too deep, context full) and test-time answers (`correct` None) are neither correct nor
wrong (as in the official code; docs/method.md, "Preference pairs").

Rows come out in a deterministic order: problems in input order, then node ids (creation order) and ranks. With
``return_stats=True`` a builder returns ``(dataset, stats)``, where `stats` counts what was read, kept and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from datasets import Dataset, Features, Value

from ..format import STEP_MARKERS, format_prompt
from ..search.generator import PROMPT_TEMPLATES
from ..search.tree import Node, SearchTree

logger = logging.getLogger(__name__)

TREE_COLUMN = "tree"
# Q gaps are compared with this slack so that e.g. 0.75 - 0.25 passes a gap of 0.5 whatever the float rounding.
_GAP_TOLERANCE = 1e-9

SFT_FEATURES = Features(
    {
        "prompt": Value("string"),
        "completion": Value("string"),
        "problem_index": Value("int64"),
        "mean_q": Value("float64"),
        "min_q": Value("float64"),
    }
)
PAIR_FEATURES = Features(
    {
        "prompt": Value("string"),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "weight": Value("float64"),
        "kind": Value("string"),
        "problem_index": Value("int64"),
        "depth": Value("int64"),
        "chosen_q": Value("float64"),
        "rejected_q": Value("float64"),
        "chosen_node": Value("int64"),
        "rejected_node": Value("int64"),
    }
)
STEP_VALUE_FEATURES = Features(
    {
        "prompt": Value("string"),
        "completion": Value("string"),
        "label": Value("float64"),
        "problem_index": Value("int64"),
        "depth": Value("int64"),
        "visits": Value("int64"),
        "node": Value("int64"),
    }
)
OUTCOME_PAIR_FEATURES = Features(
    {
        "prompt": Value("string"),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "weight": Value("float64"),
        "problem_index": Value("int64"),
        "chosen_node": Value("int64"),
        "rejected_node": Value("int64"),
    }
)

Trees = Dataset | Sequence[str | dict | SearchTree]


# -- reading trees ------------------------------------------------------------------------------------------------


def _resolve_template(prompt_template: str) -> str:
    if prompt_template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[prompt_template]
    if "{question}" in prompt_template:
        return prompt_template
    raise ValueError(
        f"prompt_template must be one of {sorted(PROMPT_TEMPLATES)} or a template with a '{{question}}' field, "
        f"got {prompt_template!r}"
    )


def _read_trees(trees: Trees) -> Iterator[SearchTree]:
    """Check the input now and parse the trees one at a time (a large run's trees need not all be in memory)."""
    if isinstance(trees, Dataset):
        if TREE_COLUMN not in trees.column_names:
            raise ValueError(
                f"the trees dataset has no {TREE_COLUMN!r} column (columns: {trees.column_names}); pass the "
                "dataset MCTSGenerator.generate() returns"
            )
        records = trees[TREE_COLUMN]
    elif isinstance(trees, (str, dict, SearchTree)):
        raise TypeError(
            f"expected a datasets.Dataset with a {TREE_COLUMN!r} column or a list of trees, got a single "
            f"{type(trees).__name__} (wrap one tree in a list; read saved trees with datasets.load_from_disk)"
        )
    else:
        records = trees
    return (_parse_tree(index, record) for index, record in enumerate(records))


def _parse_tree(index: int, record: str | dict | SearchTree | None) -> SearchTree:
    if isinstance(record, SearchTree):
        return record
    if not isinstance(record, (str, dict)):
        raise TypeError(f"tree {index}: expected tree JSON (str or dict) or a SearchTree, got {type(record).__name__}")
    try:
        return SearchTree.from_json(record)
    except ValueError as err:  # the schema-version error, malformed JSON
        raise ValueError(f"tree {index}: {err}") from err


# -- per-tree facts -----------------------------------------------------------------------------------------------


def _graded_outcomes(tree: SearchTree) -> dict[Node, tuple[bool, bool]]:
    """For every node: (some graded answer at or below it is correct, some is wrong).

    Only answer nodes with `correct` True / False count; error, depth and context terminals never do
    (docs/method.md, "Preference pairs").
    """
    correct = {node: node.terminal_reason == "answer" and node.correct is True for node in tree.nodes}
    wrong = {node: node.terminal_reason == "answer" and node.correct is False for node in tree.nodes}
    for node in reversed(tree.nodes):  # parents come before their children in `tree.nodes`
        if node.parent is not None:
            correct[node.parent] |= correct[node]
            wrong[node.parent] |= wrong[node]
    return {node: (correct[node], wrong[node]) for node in tree.nodes}


def _path_q(node: Node) -> tuple[float, float]:
    """(mean, min) of the step Q-values from the first step down to `node` (the root excluded)."""
    qs = [n.Q for n in node.path()]
    return sum(qs) / len(qs), min(qs)


def _by_path_q(answers: list[Node], highest_first: bool) -> list[Node]:
    """Answer nodes ranked by their trajectory's mean step Q; ties go to the min step Q (ranked the same way),
    then to the lower node id (the solution found first)."""
    sign = -1 if highest_first else 1

    def key(node: Node) -> tuple[float, float, int]:
        mean_q, min_q = _path_q(node)
        return sign * mean_q, sign * min_q, node.id

    return sorted(answers, key=key)


def _answers(tree: SearchTree, correct: bool) -> list[Node]:
    return [node for node in tree.terminal_nodes() if node.correct is correct]


def _take_sides(positives: list[Node], negatives: list[Node], per_side: int | None) -> tuple[list[Node], list[Node]]:
    """Paper §3.3: `per_side` on each side (2x2 pairs); when one side has a single candidate, the other side takes
    up to per_side**2 (1x4). None takes every candidate."""
    if per_side is None:
        return positives, negatives
    n_pos = per_side**2 if len(negatives) == 1 else per_side
    n_neg = per_side**2 if len(positives) == 1 else per_side
    return positives[:n_pos], negatives[:n_neg]


def _stats(*keys: str) -> dict[str, int]:
    return dict.fromkeys(keys, 0)


def _finish(
    rows: dict[str, list], features: Features, stats: dict[str, int], return_stats: bool
) -> Dataset | tuple[Dataset, dict[str, int]]:
    dataset = Dataset.from_dict(rows, features=features)
    return (dataset, stats) if return_stats else dataset


# -- pair filtering -----------------------------------------------------------------------------------------------


def _is_blank(text: str) -> bool:
    """Whether a step (or trajectory) holds nothing but step markers and whitespace."""
    for marker in STEP_MARKERS:
        text = text.replace(marker, "")
    return not text.strip()


def _normalise(text: str) -> str:
    return " ".join(text.split())


class _PairCollector:
    """Rows of a pair dataset, with the filters every pair goes through and their counts.

    A candidate pair is dropped when a side is blank (`dropped_empty`), both sides are the same text up to
    whitespace (`dropped_identical`), its Q gap is too small (`dropped_q_gap`), or the same (prompt, chosen,
    rejected) was already kept, from this tree or another (`dropped_duplicate`).
    """

    DROP_REASONS = ("dropped_empty", "dropped_identical", "dropped_q_gap", "dropped_duplicate")

    def __init__(self, features: Features, *count_keys: str):
        self.rows: dict[str, list] = {column: [] for column in features}
        self.stats = _stats("problems", *count_keys, "candidate_pairs", "pairs", *self.DROP_REASONS)
        self._seen: set[tuple[str, str, str]] = set()

    def offer(self, counter: str | None, gap_ok: bool = True, **row) -> None:
        """Keep the pair `row` unless a filter drops it; a kept pair also adds to the stat `counter`, if any."""
        self.stats["candidate_pairs"] += 1
        key = (row["prompt"], row["chosen"], row["rejected"])
        if _is_blank(row["chosen"]) or _is_blank(row["rejected"]):
            self.stats["dropped_empty"] += 1
        elif _normalise(row["chosen"]) == _normalise(row["rejected"]):
            self.stats["dropped_identical"] += 1
        elif not gap_ok:
            self.stats["dropped_q_gap"] += 1
        elif key in self._seen:
            self.stats["dropped_duplicate"] += 1
        else:
            self._seen.add(key)
            self.stats["pairs"] += 1
            if counter is not None:
                self.stats[counter] += 1
            for column, values in self.rows.items():
                values.append(row[column])


# -- builders -----------------------------------------------------------------------------------------------------


def build_sft_dataset(
    trees: Trees, top_k: int = 2, prompt_template: str = "policy", return_stats: bool = False
) -> Dataset | tuple[Dataset, dict[str, int]]:
    """Policy fine-tuning data (paper §3.4): the top-k correct solutions of every solved problem.

    A problem's correct trajectories (root-to-answer paths whose answer node has `correct` True) are ranked by
    the mean step Q along the path, highest first; ties go to the higher minimum step Q, then to the lower node
    id (the solution found first), so the output is deterministic. Unsolved problems give no rows.

    The rows are in TRL's prompt-completion format: `SFTTrainer` trains on them with completion-only loss, and
    ``prompt + completion`` is exactly the text the policy saw and wrote during the search.

    Args:
        trees: the generator's output (a `datasets.Dataset` with a `tree` column), or a list of trees (JSON
            strings, dicts or `SearchTree` objects).
        top_k: solutions kept per problem (paper §3.4: 2).
        prompt_template: "policy" (the plain prompt of fine-tuned policies, paper §3.2), "few_shot" or a template
            with a `{question}` field. Keep "policy" for trees searched with the round-1 few-shot prompt too: the
            fine-tuned policy is prompted with the plain prompt in the next round.
        return_stats: also return counts: `problems`, `problems_solved`, `correct_trajectories`, `rows`.

    Returns:
        A dataset with columns `prompt`, `completion` (the trajectory text, `SearchTree.trajectory_text`),
        `problem_index` (the tree's row in `trees`), `mean_q` and `min_q` (the ranking keys); with
        ``return_stats=True``, ``(dataset, stats)``.

    Raises:
        ValueError: `top_k` < 1, an unknown template, no `tree` column, or a tree of another schema version.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    template = _resolve_template(prompt_template)
    rows: dict[str, list] = {column: [] for column in SFT_FEATURES}
    stats = _stats("problems", "problems_solved", "correct_trajectories", "rows")
    for index, tree in enumerate(_read_trees(trees)):
        stats["problems"] += 1
        correct = _answers(tree, correct=True)
        stats["problems_solved"] += bool(correct)
        stats["correct_trajectories"] += len(correct)
        prompt = format_prompt(tree.question, template)
        for node in _by_path_q(correct, highest_first=True)[:top_k]:
            mean_q, min_q = _path_q(node)
            rows["prompt"].append(prompt)
            rows["completion"].append(tree.trajectory_text(node))
            rows["problem_index"].append(index)
            rows["mean_q"].append(mean_q)
            rows["min_q"].append(min_q)
            stats["rows"] += 1
    return _finish(rows, SFT_FEATURES, stats, return_stats)


def build_preference_pairs(
    trees: Trees,
    min_q_gap: float | None = 0.5,
    per_side: int = 2,
    final_step_pairs: bool = True,
    prompt_template: str = "policy",
    return_stats: bool = False,
) -> Dataset | tuple[Dataset, dict[str, int]]:
    """Step-level preference pairs for the process preference model (paper §3.3, loss Eq. 4).

    Step pairs (`kind` "step"): at every node with both a correct and a wrong graded answer below it, its
    children that lead to a correct answer are positives (highest Q first) and its children that lead to a wrong
    answer are negatives (lowest Q first); `per_side` of each are taken and every positive is paired with every
    negative (2x2 = 4 pairs; when one side has a single candidate, the other takes up to per_side**2, 1x4). A child
    that leads to both kinds of answer can be on both sides but is never paired with itself. All steps of a pair
    share the prefix: the question prompt and the steps down to that node. Pairs whose
    ``chosen_q - rejected_q`` is under `min_q_gap` are dropped (Q-values are noisy: only a clear gap says which
    step is better).

    Final-step pairs (`kind` "final", with ``final_step_pairs=True``): identical reasoning rarely ends in
    different answers, so for the final step whole trajectories are paired instead, under the question prompt
    alone: the `per_side` correct trajectories with the highest mean step Q against the `per_side` wrong ones
    with the lowest (ties: min Q, then node id), the same 2x2 / 1x4 rule. Their `chosen_q` / `rejected_q` are
    those mean Qs. The answer check already tells the two apart, so `min_q_gap` does not apply to them (with
    PPM-initialised Q, a small or reversed gap marks exactly the answers the previous PPM got wrong).

    Weights: every pair built at one prefix gets 1 / (n_pos * n_neg), the number of pairs built there (Eq. 4's
    1/(2*2)), so each prefix weighs 1 before filtering; pairs dropped afterwards keep their siblings' weights.

    Every pair is also dropped when a side is empty (only markers and whitespace), both sides are the same text
    up to whitespace, or it repeats a kept (prompt, chosen, rejected) (e.g. a root-level step pair of one-step
    solutions equals the final-step pair). Drops are counted in the stats.

    Args:
        trees: the generator's output (a `datasets.Dataset` with a `tree` column), or a list of trees (JSON
            strings, dicts or `SearchTree` objects).
        min_q_gap: smallest ``chosen_q - rejected_q`` of a kept step pair (official code: 0.5; docs/method.md); None
            keeps every step pair whatever its gap.
        per_side: positives and negatives taken at each prefix (paper §3.3: 2, so at most per_side**2 pairs each).
        final_step_pairs: also pair whole correct and wrong trajectories of each problem.
        prompt_template: "policy", "few_shot" or a template with a `{question}` field. The PPM must score with
            the same template it was trained on.
        return_stats: also return the counts: `problems`, `prefixes` (nodes where step pairs were built),
            `candidate_pairs`, `step_pairs`, `final_step_pairs`, `pairs` (kept), and `dropped_empty`,
            `dropped_identical`, `dropped_q_gap`, `dropped_duplicate`; candidate_pairs = pairs + all drops.

    Returns:
        A dataset with columns `prompt` (question prompt + shared prefix), `chosen`, `rejected` (step texts, or
        whole trajectories for final-step pairs), `weight`, `kind` ("step" / "final"), `problem_index`, `depth`
        (steps in the shared prefix: 0 for first steps and for final-step pairs), `chosen_q`, `rejected_q`,
        `chosen_node`, `rejected_node` (node ids in the tree); with ``return_stats=True``, ``(dataset, stats)``.

    Raises:
        ValueError: `per_side` < 1, an unknown template, no `tree` column, or a tree of another schema version.
    """
    if per_side < 1:
        raise ValueError(f"per_side must be >= 1, got {per_side}")
    template = _resolve_template(prompt_template)
    pairs = _PairCollector(PAIR_FEATURES, "prefixes", "step_pairs", "final_step_pairs")
    for index, tree in enumerate(_read_trees(trees)):
        pairs.stats["problems"] += 1
        question_prompt = format_prompt(tree.question, template)
        outcomes = _graded_outcomes(tree)
        for parent in tree.nodes:
            if not all(outcomes[parent]):
                continue
            pairs.stats["prefixes"] += 1
            positives = sorted((c for c in parent.children if outcomes[c][0]), key=lambda c: (-c.Q, c.id))
            negatives = sorted((c for c in parent.children if outcomes[c][1]), key=lambda c: (c.Q, c.id))
            positives, negatives = _take_sides(positives, negatives, per_side)
            built = [(pos, neg) for pos in positives for neg in negatives if pos is not neg]
            prompt = question_prompt + tree.trajectory_text(parent)
            for pos, neg in built:
                pairs.offer(
                    "step_pairs",
                    gap_ok=min_q_gap is None or pos.Q - neg.Q >= min_q_gap - _GAP_TOLERANCE,
                    prompt=prompt, chosen=pos.text, rejected=neg.text, weight=1 / len(built), kind="step",
                    problem_index=index, depth=parent.depth, chosen_q=pos.Q, rejected_q=neg.Q,
                    chosen_node=pos.id, rejected_node=neg.id,
                )  # fmt: skip
        if final_step_pairs:
            positives, negatives = _take_sides(
                _by_path_q(_answers(tree, correct=True), highest_first=True),
                _by_path_q(_answers(tree, correct=False), highest_first=False),
                per_side,
            )
            for pos in positives:
                for neg in negatives:
                    pairs.offer(
                        "final_step_pairs",
                        prompt=question_prompt, chosen=tree.trajectory_text(pos), rejected=tree.trajectory_text(neg),
                        weight=1 / (len(positives) * len(negatives)), kind="final", problem_index=index, depth=0,
                        chosen_q=_path_q(pos)[0], rejected_q=_path_q(neg)[0], chosen_node=pos.id,
                        rejected_node=neg.id,
                    )  # fmt: skip
    logger.info(
        "PPM pairs: %d kept (%d step, %d final-step) from %d problems; dropped %d for the Q gap, %d identical, "
        "%d empty, %d duplicate",
        pairs.stats["pairs"], pairs.stats["step_pairs"], pairs.stats["final_step_pairs"], pairs.stats["problems"],
        pairs.stats["dropped_q_gap"], pairs.stats["dropped_identical"], pairs.stats["dropped_empty"],
        pairs.stats["dropped_duplicate"],
    )  # fmt: skip
    return _finish(pairs.rows, PAIR_FEATURES, pairs.stats, return_stats)


def build_step_values(
    trees: Trees, min_visits: int = 1, prompt_template: str = "policy", return_stats: bool = False
) -> Dataset | tuple[Dataset, dict[str, int]]:
    """Step Q-values for the PQM baseline (paper §3.3: regress Q with MSE, on the same data as the PPM).

    One row per non-root node that lies on a path to a graded answer (a correct or wrong answer at or below it),
    labelled with its Q in [-1, 1]. These are the nodes whose Q carries answer outcomes backed up by Eq. 2, the
    same nodes the PPM pairs come from. Other nodes are left out: below an error or depth terminal the -1 says
    "no valid continuation was found", not "this leads to a wrong answer", and in PPM-augmented trees (Eq. 3) a
    node no rollout went through only holds the previous PPM's own score.

    Args:
        trees: the generator's output (a `datasets.Dataset` with a `tree` column), or a list of trees (JSON
            strings, dicts or `SearchTree` objects).
        min_visits: smallest visit count N of a kept node (raise it to keep only better-estimated Q-values).
        prompt_template: "policy", "few_shot" or a template with a `{question}` field.
        return_stats: also return the counts `problems`, `rows`.

    Returns:
        A dataset with columns `prompt` (question prompt + the steps before this one), `completion` (the step
        text), `label` (the node's Q), `problem_index`, `depth` (1 for first steps), `visits` (N) and `node` (its
        id); with ``return_stats=True``, ``(dataset, stats)``.

    Raises:
        ValueError: an unknown template, no `tree` column, or a tree of another schema version.
    """
    template = _resolve_template(prompt_template)
    rows: dict[str, list] = {column: [] for column in STEP_VALUE_FEATURES}
    stats = _stats("problems", "rows")
    for index, tree in enumerate(_read_trees(trees)):
        stats["problems"] += 1
        question_prompt = format_prompt(tree.question, template)
        outcomes = _graded_outcomes(tree)
        for node in tree.nodes:
            if node.parent is None or not any(outcomes[node]) or node.visits < min_visits:
                continue
            rows["prompt"].append(question_prompt + tree.trajectory_text(node.parent))
            rows["completion"].append(node.text)
            rows["label"].append(node.Q)
            rows["problem_index"].append(index)
            rows["depth"].append(node.depth)
            rows["visits"].append(node.visits)
            rows["node"].append(node.id)
            stats["rows"] += 1
    return _finish(rows, STEP_VALUE_FEATURES, stats, return_stats)


def build_outcome_pairs(
    trees: Trees, per_side: int | None = 2, prompt_template: str = "policy", return_stats: bool = False
) -> Dataset | tuple[Dataset, dict[str, int]]:
    """Whole-solution pairs for the ORM baseline (paper §3.3: outcome only, used for best-of-N).

    For each problem with both correct and wrong graded answers, correct trajectories (chosen) are paired with
    wrong ones (rejected) under the question prompt. The ORM learns from outcomes alone, so the trajectories are
    chosen without looking at Q: in the order the search found them (node id), `per_side` of each with the
    2x2 / 1x4 rule of paper §3.3. Every pair of a problem weighs 1 / (n_pos * n_neg). Pairs with an empty side,
    identical sides or repeating a kept pair are dropped and counted.

    Args:
        trees: the generator's output (a `datasets.Dataset` with a `tree` column), or a list of trees (JSON
            strings, dicts or `SearchTree` objects).
        per_side: correct and wrong trajectories taken per problem (at most per_side**2 pairs); None pairs every
            correct trajectory with every wrong one.
        prompt_template: "policy", "few_shot" or a template with a `{question}` field.
        return_stats: also return the counts `problems`, `candidate_pairs`, `pairs` and the `dropped_*` counts.

    Returns:
        A dataset with columns `prompt` (the question prompt), `chosen`, `rejected` (whole trajectories),
        `weight`, `problem_index`, `chosen_node`, `rejected_node`; with ``return_stats=True``, ``(dataset, stats)``.

    Raises:
        ValueError: `per_side` < 1, an unknown template, no `tree` column, or a tree of another schema version.
    """
    if per_side is not None and per_side < 1:
        raise ValueError(f"per_side must be >= 1 or None, got {per_side}")
    template = _resolve_template(prompt_template)
    pairs = _PairCollector(OUTCOME_PAIR_FEATURES)
    for index, tree in enumerate(_read_trees(trees)):
        pairs.stats["problems"] += 1
        prompt = format_prompt(tree.question, template)
        positives, negatives = _take_sides(_answers(tree, correct=True), _answers(tree, correct=False), per_side)
        for pos in positives:
            for neg in negatives:
                pairs.offer(
                    None,
                    prompt=prompt, chosen=tree.trajectory_text(pos), rejected=tree.trajectory_text(neg),
                    weight=1 / (len(positives) * len(negatives)), problem_index=index, chosen_node=pos.id,
                    rejected_node=neg.id,
                )  # fmt: skip
    stats = {key: value for key, value in pairs.stats.items() if key != "dropped_q_gap"}
    return _finish(pairs.rows, OUTCOME_PAIR_FEATURES, stats, return_stats)
