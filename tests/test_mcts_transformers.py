"""End to end: MCTS with the transformers backend on a tiny policy built and bootstrapped locally."""

import pytest

from rstar_trl import MCTSConfig, MCTSGenerator, PythonExecutor, SearchTree, build_program
from rstar_trl.format import STEP_STOP_STRINGS
from rstar_trl.grading import extract_answer, grade_answer
from rstar_trl.tiny import tiny_splits, to_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy(tiny_policy) -> str:
    return tiny_policy


@pytest.fixture(scope="module")
def problems():
    # The briefly bootstrapped test policy only solves the shortest problems (level 1) with some reliability.
    return to_dataset([p for p in tiny_splits()["train"] if p["level"] == 1][:12])


def _config(**kwargs) -> MCTSConfig:
    defaults = dict(
        num_rollouts=4, num_candidates=4, max_step_tokens=48, executor_workers=1, seed=0, device="cpu", torch_threads=1
    )
    return MCTSConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def searched(policy, problems):
    generator = MCTSGenerator(policy, _config(), problems)
    return generator, generator.generate()


def test_backend_samples_steps_that_end_at_a_step_marker(policy, problems):
    generator = MCTSGenerator(policy, _config(), problems)
    prompt = generator.args.template.replace("{question}", problems[0]["problem"])
    (completions,) = generator.backend.generate([prompt], 4, STEP_STOP_STRINGS, 48, temperature=1.0, seed=0)
    assert len(completions) == 4
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped, [c.text for c in completions]
    for completion in stopped:
        assert completion.text.endswith(STEP_STOP_STRINGS) and completion.num_tokens > 0


def test_search_grows_trees_and_solves_some_problems(searched, problems):
    generator, trees = searched
    assert len(trees) == len(problems) and trees["problem"] == problems["problem"]
    assert sum(trees["num_nodes"]) > len(problems)
    assert sum(trees["solved"]) >= 1
    assert generator.stats["tokens"] > 0 and generator.stats["generation_fraction"] > 0


def test_visits_and_values_of_real_trees_follow_eq_2(searched):
    _, trees = searched
    for row in trees:
        tree = SearchTree.from_json(row["tree"])
        for node in tree.nodes:
            below = [n for n in tree.nodes if node in [n, *_ancestors(n)]]
            answers = [n for n in below if n.terminal_reason == "answer"]
            own_cut = node.terminal and node.terminal_reason != "answer"
            assert node.visits == len(answers) + own_cut
            assert node.value_sum == pytest.approx(sum(n.reward for n in answers) + (node.reward if own_cut else 0))


def _ancestors(node):
    while node.parent is not None:
        node = node.parent
        yield node


def test_every_node_is_a_step_whose_cumulative_program_runs(searched):
    _, trees = searched
    with PythonExecutor(max_workers=1) as executor:
        for row in trees:
            tree = SearchTree.from_json(row["tree"])
            for node in tree.nodes[1:]:
                assert node.text.rstrip().endswith(("<end_of_step>", "<end_of_code>", "<end_of_answer>")) or \
                    "<output>" in node.text  # fmt: skip
                if node.step.code:
                    result = executor.run(build_program([n.step for n in node.path()]))
                    assert result.ok, (node.text, result.error)


def test_every_answer_is_graded_and_valued_by_its_own_text(searched):
    # Regrade each answer node from its stored text: the search must have graded what it stored, and (no PPM, gold
    # answer known) valued the node by that verdict alone.
    _, trees = searched
    answers = 0
    for row in trees:
        tree = SearchTree.from_json(row["tree"])
        for node in tree.nodes:
            if node.terminal_reason == "answer":
                answer = extract_answer(node.step.answer or "")
                assert node.answer == answer
                assert node.correct == (answer is not None and grade_answer(answer, tree.gold_answer))
                assert (node.visits, node.value_sum) == (1, 1.0 if node.correct else -1.0)
                answers += 1
    assert answers > 0


def test_same_seed_same_model_on_cpu_gives_the_same_trees(policy, problems):
    subset = problems.select(range(4))
    first = MCTSGenerator(policy, _config(num_rollouts=2), subset).generate()
    second = MCTSGenerator(policy, _config(num_rollouts=2), subset).generate()
    assert first["tree"] == second["tree"]
    third = MCTSGenerator(policy, _config(num_rollouts=2, seed=1), subset).generate()
    assert third["tree"] != first["tree"]


def test_lanes_search_the_same_trees_as_one_wave_of_all_trees(policy, problems, searched):
    # Three lanes of 4 trees each take turns with the engine: other batches, other timing, the same samples.
    generator = MCTSGenerator(policy, _config(problems_in_flight=12, pipeline_lanes=3), problems)
    trees = generator.generate()
    assert trees["tree"] == searched[1]["tree"]
    assert generator.stats["tokens"] == searched[0].stats["tokens"]
    assert generator.stats["waves"] > searched[0].stats["waves"]  # every lane ran its own waves


def test_loaded_model_without_tokenizer_is_refused(policy, problems):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy)
    with pytest.raises(ValueError, match="processing_class"):
        MCTSGenerator(model, _config(), problems)


def test_prefix_cache_finds_the_longest_cached_prefix_and_evicts_the_least_recently_used():
    import torch

    from rstar_trl.search.backends import PrefixCache

    def kv(length):  # one layer of (keys, values), 4 bytes per float: 2 * 2 * length * 4 * 4 bytes
        return [(torch.full((2, length, 4), float(length)), torch.zeros(2, length, 4))]

    entry_bytes = 2 * 2 * 4 * 4  # per token
    cache = PrefixCache(max_bytes=entry_bytes * 9)
    cache.add([1, 2, 3], kv(3))
    cache.add([1, 2, 3, 4, 5], kv(5))
    prefix, layers = cache.longest_prefix([1, 2, 3, 4, 5, 6])
    assert prefix == (1, 2, 3, 4, 5) and layers[0][0].shape == (2, 5, 4)
    assert cache.longest_prefix([1, 2, 3, 9])[0] == (1, 2, 3)
    assert cache.longest_prefix([1, 2]) is None and cache.longest_prefix([7, 2, 3, 4]) is None
    assert cache.longest_prefix([1, 2, 3, 4]) == ((1, 2, 3), cache.longest_prefix([1, 2, 3])[1])
    # Full: 3 + 5 tokens cached; 2 more evict the least recently used entry ([1..5]: [1, 2, 3] was just used).
    cache.add([8, 9], kv(2))
    assert cache.bytes <= cache.max_bytes
    assert cache.longest_prefix([1, 2, 3, 4, 5, 6])[0] == (1, 2, 3)
    assert cache.longest_prefix([8, 9, 10])[0] == (8, 9)
    cache.add(list(range(100)), kv(100))  # larger than the whole budget: not cached, nothing evicted
    assert cache.longest_prefix(list(range(101))) is None and cache.longest_prefix([8, 9])[0] == (8, 9)


def test_prefix_cache_changes_no_sample_and_encodes_only_the_new_tokens(policy, problems):
    from rstar_trl.search import TransformersBackend

    generator = MCTSGenerator(policy, _config(prefix_cache_mb=0), problems)
    plain = generator.backend
    assert plain.prefix_cache is None
    cached = TransformersBackend(policy, device="cpu", batch_size=16, torch_threads=1, prefix_cache_mb=64)
    tiny_budget = TransformersBackend(policy, device="cpu", batch_size=16, torch_threads=1, prefix_cache_mb=1.5)
    prompts = [generator.args.template.replace("{question}", p) for p in problems["problem"][:6]]
    for depth in range(3):  # a problem prompt, then its first sample's continuation, as MCTS asks for them
        outs = [b.generate(prompts, 3, STEP_STOP_STRINGS, 48, 0.8, 0.95, seed=depth)
                for b in (plain, cached, tiny_budget)]  # fmt: skip
        assert outs[1] == outs[0] and outs[2] == outs[0]
        # the same prompts again (a retried expansion), then with the answer prompts' n=1
        assert cached.generate(prompts, 3, STEP_STOP_STRINGS, 48, 0.8, 0.95, seed=depth) == outs[0]
        assert cached.generate(prompts, 1, STEP_STOP_STRINGS, 48, 0.8, 0.95, seed=depth + 7) == plain.generate(
            prompts, 1, STEP_STOP_STRINGS, 48, 0.8, 0.95, seed=depth + 7
        )
        prompts = [prompt + row[0].text + "\n" for prompt, row in zip(prompts, outs[0])]
    assert cached.prefix_cache.hits > 0 and cached.prefix_cache.reused_tokens > 0
    small = tiny_budget.prefix_cache  # room for a few prompts: entries are evicted and reused
    assert 0 < small.bytes <= small.max_bytes and len(small.entries) < len(cached.prefix_cache.entries)


def test_trees_are_the_same_with_and_without_the_prefix_cache(policy, problems):
    subset = problems.select(range(4))
    with_cache = MCTSGenerator(policy, _config(num_rollouts=3), subset)
    trees = with_cache.generate()
    assert with_cache.backend.prefix_cache.reused_tokens > 0
    without = MCTSGenerator(policy, _config(num_rollouts=3, prefix_cache_mb=0), subset)
    assert trees["tree"] == without.generate()["tree"]


def test_the_preallocated_cache_samples_what_a_growing_cache_samples(policy, problems):
    from rstar_trl.search import TransformersBackend

    backend = TransformersBackend(policy, device="cpu", batch_size=16, torch_threads=1, prefix_cache_mb=0)
    backend.own_decoding = False  # `generate`'s path (the one multi-token stop strings take)
    prompts = [MCTSConfig().template.replace("{question}", p) for p in problems["problem"][:6]]
    width = max(backend.count_tokens(prompts))
    # A budget no longer than the prompts decodes into a preallocated (static) cache, a longer one into a growing
    # cache: samples that stop within the shorter budget must be the same.
    short = backend.generate(prompts, 3, STEP_STOP_STRINGS, 48, 0.8, 0.95, seed=5)
    long = backend.generate(prompts, 3, STEP_STOP_STRINGS, width + 8, 0.8, 0.95, seed=5)
    stopped = [(a, b) for ra, rb in zip(short, long) for a, b in zip(ra, rb) if a.finish_reason == "stop"]
    assert stopped and all(a == b for a, b in stopped)


@pytest.mark.parametrize("temperature, top_p", [(0.8, 0.95), (1.0, 1.0), (0.0, 1.0)])
def test_our_decoding_loop_samples_what_generate_samples(policy, problems, temperature, top_p):
    from rstar_trl.search import TransformersBackend

    backend = TransformersBackend(policy, device="cpu", batch_size=16, torch_threads=1, prefix_cache_mb=64)
    prompts = [MCTSConfig().template.replace("{question}", p) for p in problems["problem"][:6]]
    for depth in range(3):  # prompts of growing, unequal lengths, as a search asks for them
        outs = []
        for own, compact_below in ((False, 0.0), (True, 0.0), (True, 0.75), (True, 1.0)):
            backend.own_decoding, backend.compact_below = own, compact_below
            outs.append(backend.generate(prompts, 3, STEP_STOP_STRINGS, 40, temperature, top_p, seed=depth))
        assert outs[1] == outs[0] and outs[2] == outs[0] and outs[3] == outs[0]
        lengths = {c.num_tokens for row in outs[0] for c in row}
        assert len(lengths) > 1  # rows finish at different steps: the loop had rows to drop
        prompts = [prompt + row[0].text + "\n" for prompt, row in zip(prompts, outs[0])]
    assert backend.compactions > 0


def test_samples_that_agree_share_one_batch_row(policy, problems):
    from rstar_trl.search import TransformersBackend

    backend = TransformersBackend(policy, device="cpu", batch_size=16, torch_threads=1, prefix_cache_mb=0)
    prompts = [MCTSConfig().template.replace("{question}", p) for p in problems["problem"][:6]]
    greedy = backend.generate(prompts, 4, STEP_STOP_STRINGS, 40, 0.0, seed=0)
    assert all(len({c.text for c in row}) == 1 for row in greedy)
    # Greedy samples never part: one row per prompt decodes all four (rows that stopped linger until compaction).
    assert backend.sampled_tokens == sum(c.num_tokens for row in greedy for c in row)
    assert backend.decoded_tokens * 4 <= backend.sampled_tokens * 1.5
    backend.decoded_tokens = backend.sampled_tokens = 0
    sampled = backend.generate(prompts, 4, STEP_STOP_STRINGS, 40, 0.8, 0.95, seed=0)
    assert any(len({c.text for c in row}) > 1 for row in sampled)  # samples part...
    assert backend.decoded_tokens < backend.sampled_tokens  # ...after sharing their first tokens


def test_the_roomy_cache_layer_grows_and_drops_rows_like_a_dynamic_one():
    import torch
    from transformers.cache_utils import DynamicLayer

    from rstar_trl.search.decoding import _RoomyLayer

    roomy, plain = _RoomyLayer(room=2), DynamicLayer()
    for length in (5, 1, 1, 1, 3, 1):  # runs out of room three times
        keys, values = torch.randn(4, 2, length, 8), torch.randn(4, 2, length, 8)
        got, want = roomy.update(keys, values), plain.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert roomy.get_seq_length() == plain.get_seq_length()
        assert roomy.get_mask_sizes(1) == plain.get_mask_sizes(1)
    rows = torch.tensor([0, 2])
    roomy.batch_select_indices(rows)
    plain.batch_select_indices(rows)
    keys, values = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    got, want = roomy.update(keys, values), plain.update(keys, values)
    assert got[0].shape == (2, 2, 13, 8) and all(torch.equal(a, b) for a, b in zip(got, want))
    # Rows appended as copies of others (past the rows first allocated): a dynamic layer selecting them again.
    for sources in (torch.tensor([1, 1, 0]), torch.tensor([4, 2, 0, 3])):
        roomy.append_rows(sources)
        plain.batch_select_indices(torch.cat([torch.arange(plain.keys.shape[0]), sources]))
        keys, values = torch.randn(plain.keys.shape[0], 2, 1, 8), torch.randn(plain.keys.shape[0], 2, 1, 8)
        got, want = roomy.update(keys, values), plain.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].shape == (9, 2, 15, 8)
    # Rows kept out of order (a compaction after appended rows): gathered before the buffer is overwritten.
    rows = torch.tensor([8, 3, 0, 5])
    roomy.batch_select_indices(rows)
    plain.batch_select_indices(rows)
    keys, values = torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8)
    got, want = roomy.update(keys, values), plain.update(keys, values)
    assert got[0].shape == (4, 2, 16, 8) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_batch_mixing_cached_and_new_prompts_is_as_wide_as_its_longest_row(policy, problems):
    import torch

    from rstar_trl.search import TransformersBackend
    from rstar_trl.search.backends import encode_with_prefix_cache

    backend = TransformersBackend(policy, device="cpu", torch_threads=1, prefix_cache_mb=64)
    tokenizer = backend.tokenizer
    template = MCTSConfig().template
    long_prompt = template.replace("{question}", " ".join(problems["problem"][:3]))
    short_prompt = template.replace("{question}", problems["problem"][3])
    backend.generate([long_prompt], 2, STEP_STOP_STRINGS, 8, seed=0)  # caches the long prompt's prefix
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in (long_prompt + " x", short_prompt)]
    with torch.inference_mode():
        input_ids, mask, cache = encode_with_prefix_cache(
            backend.model, ids, tokenizer.pad_token_id, backend.device, backend.prefix_cache, hold_back=1
        )
    assert backend.prefix_cache.hits >= 1  # the long row came from the cache, the short one did not
    assert input_ids.shape[1] == max(len(x) for x in ids)  # not cached part + new part
    assert mask.sum(-1).tolist() == [len(x) for x in ids]
    assert cache.get_seq_length() == input_ids.shape[1] - 1
