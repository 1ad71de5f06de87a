"""The per-tree rules of MCTS on hand-built trees: UCT, back-propagation (Eq. 2), Eq. 3, terminals, schema."""

import math

import pytest

from rstar_trl.search import TREE_SCHEMA_VERSION, SearchTree, tree_to_html, tree_to_outline


def _tree_with_two_steps():
    tree = SearchTree("What is 2 + 3?", "5")
    a = tree.add_child(tree.root, "# a\nx = 5\n<end_of_step>\n")
    b = tree.add_child(tree.root, "# b\nx = 6\n<end_of_step>\n")
    return tree, a, b


def test_backpropagation_adds_the_value_and_a_visit_to_every_node_up_to_the_root():
    tree, a, b = _tree_with_two_steps()
    a1 = tree.add_child(a, "print(x)\n<end_of_code>")
    tree.finish(a1, "answer", 1.0)
    b1 = tree.add_child(b, "print(x)\n<end_of_code>")
    tree.finish(b1, "answer", -1.0)
    a2 = tree.add_child(a, "print(x + 1)\n<end_of_code>")
    tree.finish(a2, "answer", -1.0)
    # Scripted rollouts: a1 (+1), b1 (-1), a2 (-1)
    assert (a1.visits, a1.value_sum) == (1, 1.0)
    assert (a.visits, a.value_sum, a.Q) == (2, 0.0, 0.0)
    assert (b.visits, b.Q) == (1, -1.0)
    assert (tree.root.visits, tree.root.value_sum) == (3, -1.0)
    assert tree.root.Q == pytest.approx(-1 / 3)


def test_uct_prefers_unvisited_children_then_follows_q_plus_exploration():
    tree, a, b = _tree_with_two_steps()
    assert tree.best_child(tree.root) is a  # both unvisited: the first created
    tree.backpropagate(a, 1.0)
    assert tree.best_child(tree.root) is b  # b is still unvisited
    tree.backpropagate(b, -1.0)
    tree.backpropagate(b, 1.0)
    # root N=3; a: Q=1, N=1; b: Q=0, N=2
    assert tree.uct(a) == pytest.approx(1 + 2 * math.sqrt(math.log(3) / 1))
    assert tree.uct(b) == pytest.approx(0 + 2 * math.sqrt(math.log(3) / 2))
    assert tree.best_child(tree.root) is a


def test_exploration_constant_changes_the_choice():
    tree, a, b = _tree_with_two_steps()
    for _ in range(9):
        tree.backpropagate(a, 0.5)
    tree.backpropagate(b, 0.0)
    assert tree.best_child(tree.root) is b  # c = 2: rarely visited b wins on exploration
    tree.c_puct = 0.1
    assert tree.best_child(tree.root) is a  # small c: exploitation, a has the higher Q


def test_selection_skips_terminal_children_and_dead_ends():
    tree, a, b = _tree_with_two_steps()
    tree.finish(a, "max_depth", -1.0, backpropagate=False)
    assert tree.best_child(tree.root) is b
    b1 = tree.add_child(b, "print(x)\n<end_of_code>")
    tree.finish(b1, "answer", 1.0)
    assert not b.selectable()  # every child of b is terminal
    assert tree.select_leaf() is None  # nothing left to expand anywhere


def test_nodes_cut_for_depth_or_errors_take_the_penalty_on_that_node_only():
    tree, a, _ = _tree_with_two_steps()
    tree.finish(a, "errors", -1.0, backpropagate=False)
    assert (a.visits, a.Q, a.terminal) == (1, -1.0, True)
    assert tree.root.visits == 0


def test_ppm_initialises_inner_nodes_and_terminal_nodes_are_valued_by_their_reward_alone():
    tree, a, _ = _tree_with_two_steps()
    tree.initialise_with_score(a, 0.4)  # Eq. 3
    assert (a.visits, a.value_sum, a.ppm_score) == (1, 0.4, 0.4)
    a1 = tree.add_child(a, "print(x)\n<end_of_code>")
    tree.initialise_with_score(a1, -0.8)  # an old PPM's wrong opinion of a correct answer ...
    tree.finish(a1, "answer", 1.0)
    assert (a1.visits, a1.value_sum, a1.Q) == (1, 1.0, 1.0)  # ... does not survive: the answer was checked
    assert (a.visits, a.value_sum) == (2, pytest.approx(1.4))  # the reward is backed up on top of a's Eq. 3 value
    assert (tree.root.visits, tree.root.value_sum) == (1, 1.0)


def test_a_dead_end_backed_up_along_the_path_lowers_its_ancestors():
    tree, a, _ = _tree_with_two_steps()
    a1 = tree.add_child(a, "# c\ny = x\n<end_of_step>\n")
    tree.initialise_with_score(a1, 0.7)
    tree.finish(a1, "errors", -1.0, backpropagate=True)
    assert (a1.visits, a1.Q) == (1, -1.0) and (a.visits, a.Q) == (1, -1.0) and tree.root.visits == 1


def test_select_leaf_descends_to_an_unexpanded_node():
    tree, a, b = _tree_with_two_steps()
    tree.backpropagate(a, 1.0)
    tree.backpropagate(b, -1.0)
    a1 = tree.add_child(a, "# c\ny = x\n<end_of_step>\n")
    assert tree.select_leaf() is a1
    assert a1.path() == [a, a1]
    assert tree.trajectory_text(a1) == a.text + a1.text


def test_json_round_trip_keeps_every_node_field():
    tree, a, b = _tree_with_two_steps()
    a1 = tree.add_child(
        a, "print(x)\n<end_of_code>\n<output>5<end_of_output>\n<answer>\\boxed{5}<end_of_answer>", "5\n"
    )
    a1.answer, a1.correct = "5", True
    tree.initialise_with_score(a1, 0.3)
    tree.finish(a1, "answer", 1.0)
    data = tree.to_dict()
    assert data["schema_version"] == TREE_SCHEMA_VERSION
    assert set(data["nodes"][0]) >= {"id", "parent", "text", "output", "depth", "visits", "q", "Q", "terminal",
                                     "correct", "ppm_score"}  # fmt: skip
    again = SearchTree.from_json(tree.to_json())
    assert again.to_dict() == data
    assert again.solved and again.best_terminal().answer == "5"


def test_trees_from_another_schema_version_are_refused_with_a_clear_error():
    data = SearchTree("q", "1").to_dict()
    data["schema_version"] = 0
    with pytest.raises(ValueError, match="schema version 0"):
        SearchTree.from_json(data)


def test_best_terminal_prefers_correct_then_higher_mean_q():
    tree, a, b = _tree_with_two_steps()
    wrong = tree.add_child(b, "<answer>\\boxed{6}<end_of_answer>")
    wrong.correct = False
    tree.finish(wrong, "answer", -1.0)
    right = tree.add_child(a, "<answer>\\boxed{5}<end_of_answer>")
    right.correct, right.answer = True, "5"
    tree.finish(right, "answer", 1.0)
    assert tree.best_terminal() is right


def test_outline_and_html_show_every_node_with_its_q():
    tree, a, b = _tree_with_two_steps()
    a1 = tree.add_child(a, "print(x)\n<end_of_code>")
    a1.correct, a1.answer = True, "5"
    tree.finish(a1, "answer", 1.0)
    outline = tree_to_outline(tree.to_json())
    assert outline.count("Q=") == 4 and "[correct: 5]" in outline
    page = tree_to_html(tree)
    assert page.startswith("<!doctype html>") and page.count("<details") == 3
    assert "hsl(120" in page  # the correct leaf (Q = +1) is green
    assert "<script" not in page and "http" not in page  # self-contained
