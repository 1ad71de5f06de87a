"""Training data from search trees (paper §3.3-3.4) on hand-built trees whose expected rows are known exactly."""

import json

import pytest
from datasets import Dataset
from replay import ReplayBackend

from rstar_trl.format import FEW_SHOT_PROMPT, POLICY_PROMPT, format_prompt
from rstar_trl.ppm.data import build_outcome_pairs, build_preference_pairs, build_sft_dataset, build_step_values
from rstar_trl.search import MCTSConfig, MCTSGenerator, SearchTree

QUESTION = "What is 2 + 3?"
PROMPT = format_prompt(QUESTION, POLICY_PROMPT)


def step(tree, parent, name, ppm=None):
    """An intermediate step; with `ppm`, PPM-initialised as in rounds 3-4 (Eq. 3: N = 1, q = score)."""
    node = tree.add_child(parent, f"# {name}\nx = 5\n<end_of_step>\n")
    if ppm is not None:
        tree.initialise_with_score(node, ppm)
    return node


def answer(tree, parent, value, correct, ppm=None):
    """A graded final step, backed up to the root with +1 / -1 (Eq. 2)."""
    text = f"print(x)\n<end_of_code>\n<output>{value}<end_of_output>\n<answer>\\boxed{{{value}}}<end_of_answer>"
    node = tree.add_child(parent, text, output=f"{value}\n")
    if ppm is not None:
        tree.initialise_with_score(node, ppm)
    node.answer, node.correct = str(value), correct
    tree.finish(node, "answer", 1.0 if correct else -1.0)
    return node


def pairs_of(dataset):
    return [(row["chosen_node"], row["rejected_node"]) for row in dataset]


def two_by_two_tree():
    """Root children, PPM-initialised so their Q-values differ: three lead to a correct answer (Q 0.75, 0.5,
    0.625), three to a wrong one (Q -0.75, -0.625, -0.5), one ends in code errors with the lowest Q (-1: a dead end is
    valued -1 alone)."""
    tree = SearchTree(QUESTION, "5")
    nodes = {}
    for name, ppm, correct in [("A", 0.5, True), ("B", 0.0, True), ("C", 0.25, True),
                               ("D", -0.5, False), ("E", -0.25, False), ("F", 0.0, False)]:  # fmt: skip
        nodes[name] = step(tree, tree.root, name, ppm)
        nodes[name.lower()] = answer(tree, nodes[name], 5 if correct else 6, correct)
    nodes["G"] = step(tree, tree.root, "G", -0.75)
    tree.finish(nodes["G"], "errors", -1.0, backpropagate=False)
    return tree, nodes


# -- preference pairs -----------------------------------------------------------------------------------------------


def test_step_pairs_take_the_top_two_correct_and_bottom_two_wrong_children_with_weight_one_quarter():
    tree, n = two_by_two_tree()
    assert (n["A"].Q, n["B"].Q, n["C"].Q) == (0.75, 0.5, 0.625)
    assert (n["D"].Q, n["E"].Q, n["F"].Q, n["G"].Q) == (-0.75, -0.625, -0.5, -1.0)
    pairs = build_preference_pairs([tree], final_step_pairs=False)
    expected = [("A", "D"), ("A", "E"), ("C", "D"), ("C", "E")]
    assert pairs_of(pairs) == [(n[p].id, n[q].id) for p, q in expected]
    assert pairs["weight"] == [0.25] * 4  # Eq. 4: 1 / (2 * 2)
    assert pairs["chosen_q"] == [0.75, 0.75, 0.625, 0.625]
    assert pairs["rejected_q"] == [-0.75, -0.625, -0.75, -0.625]
    assert pairs[0]["prompt"] == PROMPT and pairs[0]["chosen"] == n["A"].text and pairs[0]["rejected"] == n["D"].text
    assert set(pairs["kind"]) == {"step"} and set(pairs["depth"]) == {0} and set(pairs["problem_index"]) == {0}


def test_final_step_pairs_pair_whole_trajectories_by_mean_q_under_the_question_prompt():
    tree, n = two_by_two_tree()
    final = build_preference_pairs([tree]).filter(lambda row: row["kind"] == "final")
    # Mean step Q: a 0.875, c 0.8125, b 0.75 (correct); d -0.875, e -0.8125, f -0.75 (wrong)
    assert pairs_of(final) == [(n[p].id, n[q].id) for p, q in [("a", "d"), ("a", "e"), ("c", "d"), ("c", "e")]]
    assert final["chosen_q"] == [0.875, 0.875, 0.8125, 0.8125]
    assert final["rejected_q"] == [-0.875, -0.8125, -0.875, -0.8125]
    assert final["weight"] == [0.25] * 4
    assert set(final["prompt"]) == {PROMPT} and set(final["depth"]) == {0}
    assert final[0]["chosen"] == n["A"].text + n["a"].text and final[0]["rejected"] == n["D"].text + n["d"].text


def test_step_pairs_come_before_final_step_pairs_in_node_order():
    tree, _ = two_by_two_tree()
    assert build_preference_pairs([tree])["kind"] == ["step"] * 4 + ["final"] * 4


def test_pairs_below_the_q_gap_are_dropped_and_counted_and_the_rest_keep_their_weight():
    tree = SearchTree(QUESTION, "5")
    p1, p2 = step(tree, tree.root, "p1", -0.5), step(tree, tree.root, "p2", -1.0)
    n1, n2 = step(tree, tree.root, "n1", 0.5), step(tree, tree.root, "n2", 0.0)
    for node, correct in [(p1, True), (p2, True), (n1, False), (n2, False)]:
        answer(tree, node, 5 if correct else 6, correct)
    assert (p1.Q, p2.Q, n1.Q, n2.Q) == (0.25, 0.0, -0.25, -0.5)
    pairs, stats = build_preference_pairs([tree], final_step_pairs=False, return_stats=True)
    assert pairs_of(pairs) == [(p1.id, n2.id), (p1.id, n1.id), (p2.id, n2.id)]  # gaps 0.75, 0.5, 0.5
    assert pairs["weight"] == [0.25] * 3
    assert stats["dropped_q_gap"] == 1  # p2 vs n1: gap 0.25
    assert pairs_of(build_preference_pairs([tree], min_q_gap=0.6, final_step_pairs=False)) == [(p1.id, n2.id)]
    assert len(build_preference_pairs([tree], min_q_gap=None, final_step_pairs=False)) == 4


def test_a_single_candidate_on_one_side_is_paired_with_up_to_four_on_the_other():
    tree = SearchTree(QUESTION, "5")
    right = step(tree, tree.root, "right")
    answer(tree, right, 5, True)
    wrong = {}
    for ppm in (-0.5, 0.0, 0.5, -1.0, 1.0):  # Q = (ppm - 1) / 2 after the wrong answer
        wrong[ppm] = step(tree, tree.root, f"wrong {ppm}", ppm)
        answer(tree, wrong[ppm], 6, False)
    pairs = build_preference_pairs([tree], final_step_pairs=False)
    assert pairs_of(pairs) == [(right.id, wrong[ppm].id) for ppm in (-1.0, -0.5, 0.0, 0.5)]  # lowest Q first
    assert pairs["weight"] == [0.25] * 4


def test_a_child_leading_to_both_answers_can_be_on_both_sides_but_never_faces_itself():
    tree = SearchTree(QUESTION, "5")
    mixed, good, bad = step(tree, tree.root, "mixed"), step(tree, tree.root, "good"), step(tree, tree.root, "bad")
    mixed_right, mixed_wrong = answer(tree, mixed, 5, True), answer(tree, mixed, 6, False)
    answer(tree, good, 5, True)
    answer(tree, bad, 6, False)
    assert (mixed.Q, good.Q, bad.Q) == (0.0, 1.0, -1.0)
    pairs = build_preference_pairs([tree], final_step_pairs=False)
    at_root = [(good.id, bad.id), (good.id, mixed.id), (mixed.id, bad.id)]
    assert pairs_of(pairs) == [*at_root, (mixed_right.id, mixed_wrong.id)]
    assert pairs["weight"] == pytest.approx([1 / 3] * 3 + [1.0])  # 3 pairs at the root, 1 below `mixed`
    assert pairs["depth"] == [0, 0, 0, 1]
    assert pairs[3]["prompt"] == PROMPT + mixed.text  # the shared prefix: the question and the step before


def test_code_error_depth_and_ungraded_leaves_never_count_as_wrong():
    tree = SearchTree(QUESTION, "5")
    answer(tree, step(tree, tree.root, "right"), 5, True)
    errors = step(tree, tree.root, "errors")
    tree.finish(step(tree, errors, "crash"), "errors", -1.0, backpropagate=False)
    too_deep = step(tree, tree.root, "too deep")
    tree.finish(too_deep, "max_depth", -1.0, backpropagate=False)
    ungraded = tree.add_child(step(tree, tree.root, "ungraded"), "<answer>\\boxed{7}<end_of_answer>")
    tree.finish(ungraded, "answer", -0.5)  # a test-time answer: scored, never graded (correct is None)
    pairs, stats = build_preference_pairs([tree], min_q_gap=None, return_stats=True)
    assert len(pairs) == 0 and stats["prefixes"] == 0
    assert len(build_outcome_pairs([tree])) == 0

    answer(tree, errors, 6, False)  # the same tree with one wrong answer: now there are pairs
    assert len(build_preference_pairs([tree], min_q_gap=None, final_step_pairs=False)) == 1


def test_empty_identical_and_repeated_pairs_are_dropped_and_counted():
    repeated = SearchTree(QUESTION, "5")  # one-step solutions: the root's step pair is also the final-step pair
    answer(repeated, repeated.root, 5, True)
    answer(repeated, repeated.root, 6, False)
    identical = SearchTree(QUESTION, "5")
    same = identical.add_child(identical.root, "# same\nx = 5\n<end_of_step>\n")
    same_spaced = identical.add_child(identical.root, "# same\nx  =  5\n<end_of_step>\n")
    answer(identical, same, 5, True)
    answer(identical, same_spaced, 6, False)
    empty = SearchTree(QUESTION, "5")
    answer(empty, step(empty, empty.root, "fine"), 5, True)
    answer(empty, empty.add_child(empty.root, "<end_of_step>\n"), 6, False)
    pairs, stats = build_preference_pairs([repeated, identical, empty], return_stats=True)
    assert list(zip(pairs["kind"], pairs["problem_index"])) == [("step", 0), ("final", 1), ("final", 2)]
    assert (stats["dropped_duplicate"], stats["dropped_identical"], stats["dropped_empty"]) == (1, 1, 1)
    assert (stats["candidate_pairs"], stats["pairs"], stats["step_pairs"], stats["final_step_pairs"]) == (6, 3, 1, 2)
    drops = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    assert stats["candidate_pairs"] == stats["pairs"] + drops


def test_pair_builders_reject_bad_sizes():
    with pytest.raises(ValueError, match="per_side"):
        build_preference_pairs([], per_side=0)
    with pytest.raises(ValueError, match="per_side"):
        build_outcome_pairs([], per_side=0)
    with pytest.raises(ValueError, match="top_k"):
        build_sft_dataset([], top_k=0)


# -- policy SFT data ------------------------------------------------------------------------------------------------


def sft_tree():
    """Correct three-node solutions (two steps, then the answer) with PPM-initialised steps: step Q = (x + 1) / 2,
    answer Q = 1 (an answer is valued by correctness alone)."""
    tree = SearchTree(QUESTION, "5")
    ends = {}
    for name, x1, x2 in [("tie_first", 0.0, 1.0), ("tie_second", 1.0, 0.0), ("higher_min", 0.5, 0.5),
                         ("best", 1.0, 1.0)]:  # fmt: skip
        first = step(tree, tree.root, name, x1)
        ends[name] = answer(tree, step(tree, first, f"{name} again", x2), 5, True)
    answer(tree, step(tree, step(tree, tree.root, "wrong", 1.0), "wrong again", 1.0), 6, False)
    return tree, ends


def test_sft_keeps_the_top_k_correct_trajectories_by_mean_then_min_q_then_node_id():
    tree, ends = sft_tree()
    # mean step Q: best 1.0; the other three 2.5 / 3; min step Q: higher_min 0.75, the ties 0.5
    sft = build_sft_dataset([tree], top_k=4)
    assert sft["completion"] == [tree.trajectory_text(ends[name])
                                 for name in ("best", "higher_min", "tie_first", "tie_second")]  # fmt: skip
    assert sft["mean_q"] == pytest.approx([1.0, 2.5 / 3, 2.5 / 3, 2.5 / 3])
    assert sft["min_q"] == [1.0, 0.75, 0.5, 0.5]
    assert build_sft_dataset([tree])["completion"] == sft["completion"][:2]  # default top_k = 2


def test_sft_prompt_plus_completion_is_the_text_the_policy_wrote_after():
    tree, ends = sft_tree()
    row = build_sft_dataset([tree], top_k=1)[0]
    path = ends["best"].path()
    assert row["prompt"] == PROMPT
    assert row["prompt"] + row["completion"] == PROMPT + "".join(node.text for node in path)
    assert build_sft_dataset([tree], top_k=1, prompt_template="few_shot")[0]["prompt"] == format_prompt(
        QUESTION, FEW_SHOT_PROMPT
    )
    assert build_sft_dataset([tree], prompt_template="Q: {question}\nA:")[0]["prompt"] == f"Q: {QUESTION}\nA:"
    with pytest.raises(ValueError, match="prompt_template"):
        build_sft_dataset([tree], prompt_template="polcy")


def test_sft_skips_unsolved_problems_and_keeps_the_row_index_of_solved_ones():
    unsolved = SearchTree(QUESTION, "5")
    answer(unsolved, step(unsolved, unsolved.root, "wrong"), 6, False)
    solved, _ = sft_tree()
    sft, stats = build_sft_dataset([unsolved, solved], return_stats=True)
    assert sft["problem_index"] == [1, 1]
    assert stats == {"problems": 2, "problems_solved": 1, "correct_trajectories": 4, "rows": 2}


# -- PQM and ORM baselines ------------------------------------------------------------------------------------------


def test_step_values_label_every_step_on_a_path_to_a_graded_answer_with_its_q():
    tree = SearchTree(QUESTION, "5")
    first = step(tree, tree.root, "first")
    right = answer(tree, first, 5, True)
    wrong = answer(tree, first, 6, False)
    other = step(tree, tree.root, "other")
    other_right = answer(tree, other, 5, True)
    errors = step(tree, tree.root, "errors")
    tree.finish(errors, "errors", -1.0, backpropagate=False)
    step(tree, tree.root, "never expanded")
    values = build_step_values([tree])
    assert values["node"] == [first.id, right.id, wrong.id, other.id, other_right.id]
    assert values["label"] == [0.0, 1.0, -1.0, 1.0, 1.0]
    assert values["visits"] == [2, 1, 1, 1, 1]
    assert values["depth"] == [1, 2, 2, 1, 2]
    assert values[1]["prompt"] == PROMPT + first.text and values[1]["completion"] == right.text
    assert build_step_values([tree], min_visits=2)["node"] == [first.id]


def test_outcome_pairs_pair_correct_and_wrong_trajectories_in_search_order_without_looking_at_q():
    tree = SearchTree(QUESTION, "5")
    right = [answer(tree, step(tree, tree.root, f"right {i}", ppm), 5, True) for i, ppm in enumerate((-1, 0, 1))]
    wrong = [answer(tree, step(tree, tree.root, f"wrong {i}", ppm), 6, False) for i, ppm in enumerate((1, -1))]
    pairs = build_outcome_pairs([tree])
    assert pairs_of(pairs) == [(r.id, w.id) for r in right[:2] for w in wrong]  # the first found, not the best Q
    assert pairs["weight"] == [0.25] * 4
    assert set(pairs["prompt"]) == {PROMPT}
    assert pairs[0]["chosen"] == tree.trajectory_text(right[0])
    everything = build_outcome_pairs([tree], per_side=None)
    assert len(everything) == 6 and everything["weight"] == pytest.approx([1 / 6] * 6)


def test_outcome_pairs_take_up_to_four_on_one_side_when_the_other_has_one():
    tree = SearchTree(QUESTION, "5")
    right = [answer(tree, step(tree, tree.root, f"right {i}"), 5, True) for i in range(3)]
    wrong = answer(tree, step(tree, tree.root, "wrong"), 6, False)
    pairs = build_outcome_pairs([tree])
    assert pairs_of(pairs) == [(r.id, wrong.id) for r in right]
    assert pairs["weight"] == pytest.approx([1 / 3] * 3)


# -- reading trees --------------------------------------------------------------------------------------------------


def test_trees_read_from_a_dataset_column_give_the_same_rows_as_tree_objects():
    tree, _ = two_by_two_tree()
    sft, _ = sft_tree()
    dataset = Dataset.from_dict({"problem": [QUESTION] * 2, "tree": [tree.to_json(), sft.to_json()]})
    for build in (build_sft_dataset, build_preference_pairs, build_step_values, build_outcome_pairs):
        rows = build(dataset).to_list()
        assert rows and rows == build([tree, sft]).to_list() == build([tree.to_dict(), sft.to_dict()]).to_list()


def test_trees_of_another_schema_version_are_refused_with_a_clear_error():
    old = SearchTree(QUESTION, "5").to_dict()
    old["schema_version"] = 0
    dataset = Dataset.from_dict({"tree": [SearchTree(QUESTION, "5").to_json(), json.dumps(old)]})
    with pytest.raises(ValueError, match="tree 1: tree schema version 0 is not supported"):
        build_preference_pairs(dataset)


def test_a_dataset_without_a_tree_column_is_an_error_naming_the_column_and_listing_those_present():
    dataset = Dataset.from_dict({"problem": [QUESTION], "trees": ["{}"]})
    for build in (build_sft_dataset, build_preference_pairs, build_step_values, build_outcome_pairs):
        with pytest.raises(ValueError, match=r"no 'tree' column \(columns: \['problem', 'trees'\]\)"):
            build(dataset)


def test_a_single_tree_is_refused_with_a_hint():
    tree, _ = two_by_two_tree()
    with pytest.raises(TypeError, match="wrap one tree in a list"):
        build_sft_dataset(tree)


def test_empty_input_gives_an_empty_dataset_with_the_documented_columns():
    assert build_preference_pairs([]).column_names == ["prompt", "chosen", "rejected", "weight", "kind",
                                                       "problem_index", "depth", "chosen_q", "rejected_q",
                                                       "chosen_node", "rejected_node"]  # fmt: skip
    assert build_sft_dataset([]).column_names == ["prompt", "completion", "problem_index", "mean_q", "min_q"]


# -- from the generator ---------------------------------------------------------------------------------------------


class RecordingBackend(ReplayBackend):
    def __init__(self, script):
        super().__init__(script)
        self.prompts: list[str] = []

    def generate(self, prompts, *args, **kwargs):
        self.prompts.extend(prompts)
        return super().generate(prompts, *args, **kwargs)


def test_generated_trees_give_prompts_the_policy_was_given():
    def script(so_far: str) -> list[str]:
        if so_far == "":
            return ["# add\nx = 2 + 3\n<end_of_step>", "# multiply\nx = 2 * 3\n<end_of_step>"]
        return ["# show it\nprint(x)\n<end_of_code>"] if so_far.count("<end_of_step>") == 1 else []

    backend = RecordingBackend(script)
    config = MCTSConfig(num_rollouts=2, num_candidates=2, executor_workers=1, executor_timeout=5, seed=0)
    trees = MCTSGenerator(backend, config, Dataset.from_dict({"problem": [QUESTION], "answer": ["5"]})).generate()
    pairs = build_preference_pairs(trees)
    assert pairs["kind"] == ["step", "final"]
    step_pair = pairs[0]
    assert step_pair["prompt"] in backend.prompts  # the prefix the policy expanded
    assert step_pair["chosen"].startswith("# add") and step_pair["rejected"].startswith("# multiply")
    sft = build_sft_dataset(trees)[0]
    answer_text = "<answer>The answer is \\boxed{5}.<end_of_answer>"  # what the backend wrote after the output
    assert sft["completion"].endswith(answer_text)
    assert (sft["prompt"] + sft["completion"]).removesuffix(answer_text) in backend.prompts
