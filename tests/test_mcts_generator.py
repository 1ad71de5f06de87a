"""MCTSGenerator's search logic with a scripted backend, and its handling of bad input."""

import json

import pytest
from datasets import Dataset
from replay import ReplayBackend

from rstar_trl.search import MCTSConfig, MCTSGenerator, SearchTree

GOOD = "# add the numbers\nx = 2 + 3\n<end_of_step>"
WRONG = "# multiply instead\nx = 2 * 3\n<end_of_step>"
BROKEN = "# divide by zero\nx = 1 / 0\n<end_of_step>"
FINISH = "# show it\nprint(x)\n<end_of_code>"


def script(so_far: str) -> list[str]:
    if so_far == "":
        return [GOOD, WRONG, BROKEN]
    if so_far.count("<end_of_step>") == 1:
        return [FINISH]
    return []


def _config(**kwargs) -> MCTSConfig:
    defaults = dict(num_rollouts=4, num_candidates=3, executor_workers=1, executor_timeout=5, seed=0)
    return MCTSConfig(**{**defaults, **kwargs})


def _problems(n=1, **columns) -> Dataset:
    return Dataset.from_dict({"problem": ["What is 2 + 3?"] * n, "answer": ["5"] * n, **columns})


def _nodes(row) -> list[dict]:
    return json.loads(row["tree"])["nodes"]


def test_correct_path_ends_with_higher_q_than_wrong_path():
    trees = MCTSGenerator(ReplayBackend(script), _config(), _problems()).generate()
    nodes = _nodes(trees[0])
    good = next(n for n in nodes if n["text"].startswith("# add"))
    wrong = next(n for n in nodes if n["text"].startswith("# multiply"))
    assert good["Q"] == 1.0 and wrong["Q"] == -1.0
    assert trees[0]["solved"] and trees[0]["best_answer"] == "5"
    assert "x = 2 + 3" in trees[0]["best_trajectory"]


def test_failing_code_never_becomes_a_node():
    generator = MCTSGenerator(ReplayBackend(script), _config(), _problems())
    trees = generator.generate()
    assert not any("1 / 0" in n["text"] for n in _nodes(trees[0]))
    assert generator.stats["dropped_code_error"] >= 1


def test_terminal_children_are_backed_up_at_creation():
    # One rollout only: it follows the first child; the terminal child of the first step is scored at once.
    trees = MCTSGenerator(ReplayBackend(script), _config(num_rollouts=1), _problems()).generate()
    nodes = _nodes(trees[0])
    terminal = [n for n in nodes if n["terminal"]]
    assert len(terminal) == 1 and terminal[0]["visits"] == 1 and terminal[0]["correct"]
    assert nodes[0]["visits"] == 1 and nodes[0]["q"] == 1.0  # already backed up to the root


def test_final_step_carries_the_program_output_and_the_answer():
    trees = MCTSGenerator(ReplayBackend(script), _config(), _problems()).generate()
    final = next(n for n in _nodes(trees[0]) if n["correct"])
    assert "<output>5<end_of_output>" in final["text"] and "\\boxed{5}" in final["text"]
    assert final["output"].strip() == "5"


def test_each_wave_makes_one_generation_call_for_all_trees():
    backend = ReplayBackend(script)
    generator = MCTSGenerator(backend, _config(num_rollouts=2, problems_in_flight=8), _problems(n=8))
    generator.generate()
    step_calls = [calls for calls in backend.calls if calls[1] == 3]
    assert step_calls[0] == (8, 3)  # the first wave expands the 8 roots in one call
    assert len(step_calls) == generator.stats["waves"]
    answer_calls = [calls for calls in backend.calls if calls[1] == 1]
    assert answer_calls[0][0] == 8  # one answer call for all programs closed in that wave


def test_rows_come_back_in_input_order_with_the_extra_columns():
    problems = Dataset.from_dict({"problem": [f"What is 2 + {i}?" for i in range(5)],
                                  "answer": ["2", "3", "4", "5", "7"], "source": list("abcde")})  # fmt: skip
    trees = MCTSGenerator(ReplayBackend(script), _config(num_rollouts=2), problems).generate()
    assert trees["problem"] == problems["problem"] and trees["source"] == list("abcde")
    assert trees["solved"] == [False, False, False, True, False]  # the script only ever answers 5 or 6


def test_rollout_budget_is_respected():
    trees = MCTSGenerator(ReplayBackend(script), _config(num_rollouts=3), _problems()).generate()
    assert trees[0]["rollouts"] <= 3


def test_same_seed_gives_the_same_trees():
    first = MCTSGenerator(ReplayBackend(script), _config(), _problems(n=3)).generate()
    second = MCTSGenerator(ReplayBackend(script), _config(), _problems(n=3)).generate()
    assert first["tree"] == second["tree"]


def test_ppm_initialises_new_nodes_and_values_terminals_at_test_time():
    class LengthScorer:  # a deterministic scorer: longer partial solutions score higher
        def __init__(self):
            self.calls = 0

        def score(self, questions, partial_solutions):
            self.calls += 1
            return [min(1.0, len(s) / 100) for s in partial_solutions]

    scorer = LengthScorer()
    problems = Dataset.from_dict({"problem": ["What is 2 + 3?"]})  # no answer column: test-time mode
    generator = MCTSGenerator(ReplayBackend(script), _config(num_rollouts=2), problems, ppm=scorer)
    trees = generator.generate()
    nodes = _nodes(trees[0])
    first_step = next(n for n in nodes if n["text"].startswith("# add"))
    assert first_step["ppm_score"] == pytest.approx(len(first_step["text"]) / 100)
    terminal = next(n for n in nodes if n["terminal"])
    assert terminal["correct"] is None and terminal["reward"] == pytest.approx(terminal["ppm_score"])
    assert scorer.calls == generator.stats["waves"]  # one batched scoring call per wave


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        MCTSGenerator(ReplayBackend(script), _config(), Dataset.from_dict({"problem": [], "answer": []}))


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"\['answer'\]"):
        MCTSGenerator(ReplayBackend(script), _config(), Dataset.from_dict({"problem": ["x"]}))
    with pytest.raises(ValueError, match=r"\['problem'\]"):
        MCTSGenerator(ReplayBackend(script), _config(), Dataset.from_dict({"question": ["x"], "answer": ["1"]}))


def test_unparseable_gold_answers_are_counted_and_left_unsolved():
    problems = Dataset.from_dict({"problem": ["What is 2 + 3?"] * 2, "answer": ["5", "\\frac{"]})
    generator = MCTSGenerator(ReplayBackend(script), _config(), problems)
    trees = generator.generate()
    assert trees["status"] == ["searched", "unparseable_gold_answer"]
    assert trees["solved"] == [True, False]
    assert generator.stats["unparseable_gold_answer"] == 1


def test_garbage_output_without_step_markers_ends_unsolved_with_counted_reasons():
    backend = ReplayBackend(lambda so_far: ["@@ !! ?? no marker here", "x = = ="])
    generator = MCTSGenerator(backend, _config(max_consecutive_errors=2), _problems(n=2))
    trees = generator.generate()
    assert trees["solved"] == [False, False] and trees["num_nodes"] == [0, 0]
    assert generator.stats["dropped_no_step_marker"] > 0
    assert generator.stats["terminal_errors"] == 2  # each root gave up after 2 failed expansions


def test_prompts_longer_than_the_context_are_skipped_and_counted():
    problems = Dataset.from_dict({"problem": ["What is 2 + 3?", "word " * 500], "answer": ["5", "1"]})
    generator = MCTSGenerator(ReplayBackend(script, max_context=300), _config(max_step_tokens=64), problems)
    trees = generator.generate()
    assert trees["status"] == ["searched", "prompt_too_long"]
    assert generator.stats["prompt_too_long"] == 1


def test_stats_report_tokens_and_where_the_time_went():
    generator = MCTSGenerator(ReplayBackend(script), _config(), _problems())
    generator.generate()
    stats = generator.stats
    assert stats["tokens"] > 0 and stats["tokens_per_s"] > 0
    fractions = [stats[f"{p}_fraction"] for p in ("generation", "execution", "scoring", "grading", "bookkeeping")]
    assert sum(fractions) == pytest.approx(1.0, abs=0.01)


def test_max_depth_makes_deep_nodes_terminal_with_a_penalty():
    chain = lambda so_far: [f"# step\nx{so_far.count('<end_of_step>')} = 1\n<end_of_step>"]  # noqa: E731
    trees = MCTSGenerator(ReplayBackend(chain), _config(num_rollouts=1, max_depth=3), _problems()).generate()
    tree = SearchTree.from_json(trees[0]["tree"])
    deepest = max(tree.nodes, key=lambda n: n.depth)
    assert deepest.depth == 3 and deepest.terminal_reason == "max_depth" and deepest.Q == -1.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_rollouts"):
        MCTSConfig(num_rollouts=0)
    with pytest.raises(ValueError, match="backend"):
        MCTSConfig(backend="nope")
    with pytest.raises(ValueError, match="prompt_template"):
        MCTSConfig(prompt_template="no placeholder")


def test_bare_step_markers_are_dropped_as_empty_steps():
    backend = ReplayBackend(lambda so_far: ["<end_of_step>", GOOD] if so_far == "" else script(so_far))
    generator = MCTSGenerator(backend, _config(num_candidates=2), _problems())
    trees = generator.generate()
    assert generator.stats["dropped_empty_step"] >= 1
    assert all(n["text"].strip() != "<end_of_step>" for n in _nodes(trees[0]))
