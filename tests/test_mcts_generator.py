"""MCTSGenerator's search logic with a scripted backend, and its handling of bad input."""

import json
import time

import pytest
from datasets import Dataset
from replay import ReplayBackend

from rstar_trl.format import STEP_STOP_STRINGS
from rstar_trl.search import MCTSConfig, MCTSGenerator, SearchTree, mix_seed
from rstar_trl.search.shards import ShardStore

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


def test_the_tokens_of_dropped_candidates_are_counted_by_reason():
    # Each expansion of a first step samples FINISH three times: one is kept, two are duplicates of it.
    generator = MCTSGenerator(ReplayBackend(script), _config(), _problems())
    generator.generate()
    stats = generator.stats
    assert stats["dropped_duplicate"] >= 2 and stats["dropped_code_error"] >= 1
    assert stats["tokens_dropped_duplicate"] == stats["dropped_duplicate"] * len(FINISH.split())
    assert stats["tokens_dropped_code_error"] == stats["dropped_code_error"] * len(BROKEN.split())
    assert stats["tokens_dropped_duplicate"] + stats["tokens_dropped_code_error"] < stats["tokens"]


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


class SeedRecorder(ReplayBackend):
    """The scripted backend, recording the seed of every step request by its prompt."""

    def __init__(self, script):
        super().__init__(script)
        self.seeds: dict[str, list[int]] = {}

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        for prompt, one_seed in zip(prompts, seed):
            self.seeds.setdefault(prompt, []).append(one_seed)
        return super().generate(prompts, n, stop, max_new_tokens, temperature, top_p, seed)


def test_a_problems_seeds_do_not_depend_on_the_other_problems_in_flight():
    problems = Dataset.from_dict({"problem": [f"What is 2 + {i}?" for i in range(6)], "answer": ["5"] * 6})
    alone, batched = SeedRecorder(script), SeedRecorder(script)
    MCTSGenerator(alone, _config(problems_in_flight=1), problems).generate()
    MCTSGenerator(batched, _config(problems_in_flight=6), problems).generate()
    assert alone.seeds == batched.seeds
    assert len({seed for seeds in alone.seeds.values() for seed in seeds}) > 6  # per problem, node and attempt


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


class Metered(ReplayBackend):
    """The scripted backend, counting the tokens it returns and the time spent inside its calls."""

    def __init__(self, script):
        super().__init__(script)
        self.tokens = 0
        self.seconds = 0.0

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        start = time.perf_counter()
        results = super().generate(prompts, n, stop, max_new_tokens, temperature, top_p, seed)
        self.tokens += sum(c.num_tokens for row in results for c in row)
        self.seconds += time.perf_counter() - start
        return results


def test_stats_count_the_backends_tokens_and_charge_its_time_to_generation():
    backend = Metered(script)
    generator = MCTSGenerator(backend, _config(), _problems(n=3))
    generator.generate()
    stats = generator.stats
    assert stats["tokens"] == backend.tokens > 0
    # Every second spent inside the backend happened inside the generator's generation timer.
    assert stats["generation_s"] >= round(backend.seconds, 3) - 0.001
    assert stats["execution_s"] > 0  # the programs ran in the sandbox
    assert stats["answers_correct"] + stats["answers_wrong"] == sum(
        n["terminal_reason"] == "answer" for row in generator.generate() for n in _nodes(row)
    )


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


# -- fidelity: terminal values, rollouts as descents, executed answers (docs/method.md) -------------------------

RIGHT = "# show it\nprint(x)\n<end_of_code>"
WRONG_FINISH = "# show one more\nprint(x + 1)\n<end_of_code>"


class OpinionatedScorer:
    """A PPM that is wrong about both answers: it rates the correct one -0.8 and the wrong one 0.6."""

    def score(self, questions, partial_solutions):
        return [0.6 if "print(x + 1)" in s else -0.8 if "print(x)" in s else 0.0 for s in partial_solutions]


def test_with_a_gold_answer_terminal_nodes_are_valued_by_correctness_not_by_the_ppm():
    from rstar_trl.ppm import build_preference_pairs

    backend = ReplayBackend(lambda so_far: [GOOD] if so_far == "" else [RIGHT, WRONG_FINISH])
    config = _config(num_rollouts=1, num_candidates=2)
    trees = MCTSGenerator(backend, config, _problems(), ppm=OpinionatedScorer()).generate()
    tree = SearchTree.from_json(trees[0]["tree"])
    right = next(n for n in tree.nodes if n.correct)
    wrong = next(n for n in tree.nodes if n.terminal_reason == "answer" and not n.correct)
    # Before: Eq. 3 then +-1 on top gave Q = 0.1 and -0.2, a gap under 0.5 that dropped the pair below.
    assert (right.visits, right.Q, wrong.visits, wrong.Q) == (1, 1.0, 1, -1.0)
    assert right.ppm_score is None and wrong.ppm_score is None  # not scored: their value is known
    first = right.parent
    assert first.ppm_score == 0.0 and (first.visits, first.value_sum) == (3, 0.0)  # Eq. 3 + the two answers
    pairs = build_preference_pairs(trees, min_q_gap=0.5)
    step_pairs = [p for p in pairs if p["kind"] == "step"]
    assert len(step_pairs) == 1 and "print(x)" in step_pairs[0]["chosen"]
    assert "print(x + 1)" in step_pairs[0]["rejected"]


class FailsFirst:
    """Root expansions fail (only broken code) for the first `failures` calls, then give a good step."""

    def __init__(self, failures: int):
        self.failures = failures
        self.root_calls = 0

    def __call__(self, so_far: str) -> list[str]:
        if so_far == "":
            self.root_calls += 1
            return [BROKEN] if self.root_calls <= self.failures else [GOOD]
        return script(so_far)


def test_a_failed_expansion_is_retried_within_the_same_rollout():
    generator = MCTSGenerator(ReplayBackend(FailsFirst(2)), _config(num_rollouts=1), _problems())
    trees = generator.generate()
    # Before: each failed expansion ended a rollout, so the only rollout was spent on broken code.
    assert trees[0]["solved"] and trees[0]["rollouts"] == 1
    assert generator.stats["failed_expansions"] == 2 and generator.stats.get("terminal_errors", 0) == 0


def test_a_leaf_that_keeps_failing_becomes_a_dead_end_and_later_rollouts_leave_it():
    def dead_first_step(so_far):
        if so_far == "":
            return [GOOD, WRONG]
        return [BROKEN] if "2 + 3" in so_far else [FINISH]

    config = _config(num_rollouts=2, num_candidates=2, max_consecutive_errors=3)
    generator = MCTSGenerator(ReplayBackend(dead_first_step), config, _problems())
    trees = generator.generate()
    tree = SearchTree.from_json(trees[0]["tree"])
    good = next(n for n in tree.nodes if "2 + 3" in n.text)
    assert (good.terminal_reason, good.visits, good.Q) == ("errors", 1, -1.0)  # -1 on that node only
    assert trees[0]["rollouts"] == 2  # the descent that ended at the dead end counts; the retries did not
    assert generator.stats["failed_expansions"] == 3
    assert any(n.terminal_reason == "answer" for n in tree.nodes)  # the second rollout went down the other child
    assert tree.root.visits == 1  # only the answer was backed up


def test_dead_ends_can_be_backed_up_to_the_root():
    def dead_first_step(so_far):
        return [GOOD, WRONG] if so_far == "" else [BROKEN] if "2 + 3" in so_far else [FINISH]

    config = _config(num_rollouts=2, num_candidates=2, dead_end_backup="path")
    trees = MCTSGenerator(ReplayBackend(dead_first_step), config, _problems()).generate()
    tree = SearchTree.from_json(trees[0]["tree"])
    assert tree.root.visits == 2 and tree.root.value_sum == -2.0  # the dead end's -1 and the wrong answer's -1


UNEXECUTED = "# the sum is five\n<answer>The answer is \\boxed{5}.<end_of_answer>"


def test_answers_without_an_executed_program_are_dropped_and_counted():
    backend = ReplayBackend(lambda so_far: [UNEXECUTED, GOOD] if so_far == "" else script(so_far))
    generator = MCTSGenerator(backend, _config(num_candidates=2), _problems())
    trees = generator.generate()
    assert generator.stats["dropped_unexecuted_answer"] >= 1
    assert not any("the sum is five" in n["text"] for n in _nodes(trees[0]))
    assert trees[0]["solved"]  # through the executed program


def test_unexecuted_answers_can_be_allowed_for_policies_that_do_not_write_code():
    backend = ReplayBackend(lambda so_far: [UNEXECUTED] if so_far == "" else [])
    generator = MCTSGenerator(backend, _config(num_candidates=1, allow_unexecuted_answers=True), _problems())
    trees = generator.generate()
    assert trees[0]["solved"] and generator.stats.get("dropped_unexecuted_answer", 0) == 0


# -- search passes: problems still unsolved searched again in the same run (paper §3.4.2, round 4) -------------


class SeededReplay(ReplayBackend):
    """The scripted backend sampling as a policy does: each request's seed picks which scripted options come first,
    so a tree depends on its seeds. Records the seeds of every step-generation call, in order."""

    def __init__(self, script, crash_at_seed: int | None = None):
        super().__init__(lambda so_far: self._rotate(script(so_far)))
        self.seed = 0
        self.crash_at_seed = crash_at_seed
        self.step_calls: list[list[int]] = []

    def _rotate(self, options: list[str]) -> list[str]:
        k = self.seed % len(options) if options else 0
        return options[k:] + options[:k]

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        if stop == STEP_STOP_STRINGS:
            self.step_calls.append(list(seed))
            if self.crash_at_seed in seed:
                raise RuntimeError("the machine went away")
        results = []
        for prompt, one in zip(prompts, seed):
            self.seed = one
            results += super().generate([prompt], n, stop, max_new_tokens, temperature, top_p, [one])
        return results

    @property
    def step_seeds(self) -> set[int]:
        return {seed for call in self.step_calls for seed in call}


def _root_seed(seed: int, search_pass: int, index: int) -> int:
    """The seed of a problem's first root expansion in a pass (run seed + pass, problem index, node 0, attempt 0)."""
    return mix_seed(seed + search_pass, index, 0, 0)


def _shard_rows(folder) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("shards/*.jsonl")) for line in path.open()]


MIXED = ["5", "7", "5", "7", "5", "5"]  # the script never answers 7: those problems stay unsolved in every pass


def _mixed_problems(answers=MIXED) -> Dataset:
    return Dataset.from_dict({"problem": [f"What is 2 + 3? (#{i})" for i in range(len(answers))], "answer": answers})


def test_a_problem_unsolved_after_its_pass_gets_a_fresh_search_in_the_same_run(tmp_path):
    config = dict(num_rollouts=2, num_candidates=1, problems_in_flight=3)
    baseline = MCTSGenerator(SeededReplay(script), _config(**config), _mixed_problems()).generate()
    backend = SeededReplay(script)
    generator = MCTSGenerator(backend, _config(**config, unsolved_rollouts=[2], output_dir=str(tmp_path)),
                              _mixed_problems())  # fmt: skip
    trees = generator.generate()
    assert baseline["search_pass"] == [0] * len(MIXED)
    assert any(baseline["solved"]) and not all(baseline["solved"])
    # Solved in pass 0: that row; unsolved: the row of pass 1, a new tree with the pass's budget.
    assert trees["search_pass"] == [0 if solved else 1 for solved in baseline["solved"]]
    for i, row in enumerate(trees):
        if row["search_pass"] == 0:
            assert row == baseline[i]
        else:
            assert row["rollouts"] <= 2 and _root_seed(0, 1, i) in backend.step_seeds
    assert [trees["solved"][i] for i, answer in enumerate(MIXED) if answer == "7"] == [False, False]
    # Pass 0 is the search a run without extra passes makes: same seeds, same trees (every pass's row is saved).
    pass0 = {row["index"]: row for row in _shard_rows(tmp_path) if row["search_pass"] == 0}
    assert sorted(pass0) == list(range(len(MIXED)))
    for i, row in pass0.items():
        assert {k: row[k] for k in baseline.column_names} == baseline[i]
    stats = generator.stats
    again = len(MIXED) - sum(baseline["solved"])
    assert stats["problems_searched_pass0"] == len(MIXED) and stats["problems_searched_pass1"] == again
    assert stats["problems_solved_pass0"] == sum(baseline["solved"])
    assert stats["problems_searched"] == len(MIXED)  # the final result, once per problem
    assert stats["problems_solved"] == sum(trees["solved"]) == stats["problems_solved_pass0"] + stats[
        "problems_solved_pass1"]  # fmt: skip
    assert stats["tokens_pass0"] + stats["tokens_pass1"] == stats["tokens"]


def test_every_extra_pass_runs_until_the_problem_is_solved_or_the_passes_end():
    backend = SeededReplay(script)
    config = _config(num_rollouts=1, unsolved_rollouts=[2, 3], problems_in_flight=2)
    generator = MCTSGenerator(backend, config, _mixed_problems(["7", "5"]))
    trees = generator.generate()
    assert trees["search_pass"][0] == 2 and not trees["solved"][0] and trees["rollouts"][0] <= 3
    assert {_root_seed(0, 1, 0), _root_seed(0, 2, 0)} <= backend.step_seeds  # seed + pass, the problem's index
    assert generator.stats["problems_searched_pass2"] == 1


def test_the_trees_in_flight_stay_full_while_later_passes_are_queued():
    # Problems 0 and 2 stay unsolved: each pass 1 joins the queue, ahead of the problems still waiting, when its
    # pass 0 ends. Searched pass after pass, pass 1 would start only once every pass-0 tree had finished, after
    # problem 4, searched alone at the end of pass 0 with a slot empty.
    backend = SeededReplay(script)
    problems = _mixed_problems(["7", "5", "7", "5", "5"])
    config = _config(num_rollouts=1, num_candidates=3, unsolved_rollouts=[1], problems_in_flight=2)
    MCTSGenerator(backend, config, problems).generate()
    first_call = {}
    for number, seeds in enumerate(backend.step_calls):
        for seed in seeds:
            first_call.setdefault(seed, number)
    assert first_call[_root_seed(0, 1, 0)] < first_call[_root_seed(0, 0, 4)]  # pass 1 of 0 before pass 0 of 4
    sizes = [len(seeds) for seeds in backend.step_calls]
    assert sizes[0] == 2 and all(a >= b for a, b in zip(sizes, sizes[1:])), sizes  # a free slot stays free: no work


def test_an_interrupted_run_with_passes_resumes_where_each_problem_stands(tmp_path):
    problems = _mixed_problems(["5", "7", "7", "5"])
    config = dict(num_rollouts=2, num_candidates=1, unsolved_rollouts=[2], problems_in_flight=1, shard_size=1)
    reference = MCTSGenerator(SeededReplay(script), _config(**config), problems).generate()
    # The machine goes away when problem 1 (unsolved after pass 0) starts its pass 1: its pass-0 row is saved.
    crashing = SeededReplay(script, crash_at_seed=_root_seed(0, 1, 1))
    with pytest.raises(RuntimeError, match="went away"):
        MCTSGenerator(crashing, _config(**config, output_dir=str(tmp_path)), problems).generate()
    saved = {(row["index"], row["search_pass"]) for row in _shard_rows(tmp_path)}
    assert (1, 0) in saved and not any(index >= 2 for index, _ in saved)

    backend = SeededReplay(script)
    generator = MCTSGenerator(backend, _config(**config, output_dir=str(tmp_path)), problems)
    trees = generator.generate()
    assert trees.to_dict() == reference.to_dict()  # what an uninterrupted run gives
    assert _root_seed(0, 0, 1) not in backend.step_seeds  # pass 0 of problem 1 was not searched again...
    assert _root_seed(0, 1, 1) in backend.step_seeds  # ...its pass 1 was
    stats = generator.stats
    assert stats["problems_resumed"] == 1 and stats["problems_resumed_for_pass1"] == 1
    assert stats["problems_searched"] == 3  # problem 1's last pass, problems 2 and 3
    again = MCTSGenerator(SeededReplay(script), _config(**config, output_dir=str(tmp_path)), problems)
    assert again.generate().to_dict() == reference.to_dict() and again.stats["problems_resumed"] == 4


def test_problems_without_a_gold_answer_get_no_extra_pass():
    class Scorer:
        def score(self, questions, partial_solutions):
            return [0.0] * len(partial_solutions)

    problems = Dataset.from_dict({"problem": ["What is 2 + 3?"]})  # test time: "unsolved" is not known
    generator = MCTSGenerator(ReplayBackend(script), _config(unsolved_rollouts=[4]), problems, ppm=Scorer())
    trees = generator.generate()
    assert trees["search_pass"] == [0] and "problems_searched_pass1" not in generator.stats


def test_of_a_problems_saved_rows_the_latest_pass_wins(tmp_path):
    store = ShardStore(str(tmp_path), {"seed": 0}, shard_size=1)
    store.add({"index": 0, "search_pass": 1, "solved": True})
    store.add({"index": 0, "search_pass": 0, "solved": False})  # a later shard, an earlier pass
    store.add({"index": 1, "solved": False})  # written before passes existed: pass 0
    assert store.load() == {0: {"index": 0, "search_pass": 1, "solved": True}, 1: {"index": 1, "solved": False}}


def test_output_dirs_searched_before_extra_passes_existed_still_resume(tmp_path):
    ShardStore(str(tmp_path), {"seed": 0})  # run.json without unsolved_rollouts
    ShardStore(str(tmp_path), {"seed": 0, "unsolved_rollouts": []}, defaults={"unsolved_rollouts": []})
    with pytest.raises(ValueError, match=r"unsolved_rollouts: \[\] -> \[64\]"):
        ShardStore(str(tmp_path), {"seed": 0, "unsolved_rollouts": [64]}, defaults={"unsolved_rollouts": []})


def test_unsolved_rollouts_must_be_positive_counts():
    with pytest.raises(ValueError, match=r"unsolved_rollouts .*\[64, 0\] \(0 is not\)"):
        MCTSConfig(unsolved_rollouts=[64, 0])
    assert MCTSConfig(unsolved_rollouts=(64, 128)).unsolved_rollouts == [64, 128]  # as run.json stores it


# -- pipeline lanes ---------------------------------------------------------------------------------------------


def test_lanes_search_the_same_trees_as_one_wave_of_all_trees(tmp_path):
    # Seeded options, a failing step and extra passes: every tree depends on its own seeds only, so splitting the
    # trees in flight into lanes (which changes which trees share a call, and when) changes no tree.
    problems = _mixed_problems(MIXED * 2)
    config = dict(num_rollouts=2, num_candidates=1, unsolved_rollouts=[2], problems_in_flight=4)
    one = MCTSGenerator(SeededReplay(script), _config(**config), problems)
    reference = one.generate()
    for lanes in (2, 4):
        output_dir = str(tmp_path / str(lanes))
        generator = MCTSGenerator(SeededReplay(script), _config(**config, pipeline_lanes=lanes, output_dir=output_dir),
                                  problems)  # fmt: skip
        assert generator.generate().to_dict() == reference.to_dict()
        for name in ("tokens", "candidates", "problems_solved", "problems_searched_pass1", "dropped_code_error"):
            assert generator.stats[name] == one.stats[name], name
        assert sorted(row["index"] for row in _shard_rows(tmp_path / str(lanes)) if row["search_pass"] == 0) == list(
            range(len(problems)))  # fmt: skip


class SlowScorer:
    """A PPM whose every call takes `seconds`, noting whether it is scoring."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = seconds
        self.scoring = False

    def score(self, questions, partial_solutions):
        self.scoring = True
        time.sleep(self.seconds)
        self.scoring = False
        return [0.5] * len(partial_solutions)


class WatchedReplay(SeededReplay):
    """Counts the generation calls made while the scorer is scoring, and those made after `crashed` is set."""

    def __init__(self, script, scorer: SlowScorer | None = None, crash_at_seed: int | None = None):
        super().__init__(script, crash_at_seed=crash_at_seed)
        self.scorer = scorer
        self.during_scoring = self.after_crash = 0
        self.crashed = False

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        self.during_scoring += bool(self.scorer and self.scorer.scoring)
        self.after_crash += self.crashed
        self.crashed |= stop == STEP_STOP_STRINGS and self.crash_at_seed in seed
        return super().generate(prompts, n, stop, max_new_tokens, temperature, top_p, seed)


def test_lanes_generate_for_some_trees_while_others_are_scored():
    # Each scoring call takes 0.1 s. With two lanes, once one lane is scoring, the other generates: after both meet
    # at the scorer, the one that scored first runs its next wave's generation while the other scores.
    problems = _mixed_problems(MIXED)
    config = dict(num_rollouts=2, num_candidates=3, problems_in_flight=4)
    scorer = SlowScorer()
    backend = WatchedReplay(script, scorer)
    with_lanes = MCTSGenerator(backend, _config(**config, pipeline_lanes=2), problems, ppm=scorer).generate()
    assert backend.during_scoring >= 1
    scorer = SlowScorer()
    backend = WatchedReplay(script, scorer)
    one = MCTSGenerator(backend, _config(**config), problems, ppm=scorer)  # one wave at a time
    assert one.generate().to_dict() == with_lanes.to_dict()
    assert backend.during_scoring == 0


def test_a_failing_lane_stops_every_lane_and_keeps_the_finished_trees(tmp_path):
    problems = _mixed_problems(["5", "7"] * 5)
    config = dict(num_rollouts=2, num_candidates=1, problems_in_flight=2, pipeline_lanes=2, shard_size=1)
    crashing = WatchedReplay(script, crash_at_seed=_root_seed(0, 0, 3))
    with pytest.raises(RuntimeError, match="went away"):
        MCTSGenerator(crashing, _config(**config, output_dir=str(tmp_path)), problems).generate()
    # The other lane ends the wave it is in (a step call and an answer call at most) and stops: the 5 problems
    # still queued are left for the next run.
    assert crashing.after_crash <= 2
    saved = {row["index"] for row in _shard_rows(tmp_path)}
    assert saved and 3 not in saved and len(saved) <= 4
    generator = MCTSGenerator(WatchedReplay(script), _config(**config, output_dir=str(tmp_path)), problems)
    trees = generator.generate()
    reference = MCTSGenerator(SeededReplay(script), _config(**config), problems).generate()
    assert trees.to_dict() == reference.to_dict() and generator.stats["problems_resumed"] == len(saved)


def test_lanes_must_split_the_problems_in_flight():
    with pytest.raises(ValueError, match=r"pipeline_lanes \(5\) .*problems in flight \(4\)"):
        MCTSConfig(problems_in_flight=4, pipeline_lanes=5)
    with pytest.raises(ValueError, match="pipeline_lanes must be >= 1"):
        MCTSConfig(pipeline_lanes=0)
