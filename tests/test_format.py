"""The code-augmented step format: rendering, parsing, cumulative programs, prompts and special tokens."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rstar_trl import (
    ANSWER_END,
    CODE_END,
    FEW_SHOT_PROMPT,
    OUTPUT_START,
    POLICY_PROMPT,
    STEP_END,
    STEP_MARKERS,
    PythonExecutor,
    Step,
    add_step_tokens,
    build_program,
    few_shot_prompt,
    format_prompt,
    parse_step,
    render_step,
    render_steps,
    render_trajectory,
    split_steps,
)

# Text that contains no step marker and no newline: one comment line or one line of an answer/output.
_line = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="<>"), max_size=30)
_comment = st.lists(_line, min_size=0, max_size=3).map("\n".join)
# Code lines are not comments and not blank, so the comment/code boundary is unambiguous.
_code_line = st.from_regex(r"[a-z_][a-z0-9_]{0,8} = [0-9]{1,4}( \+ [a-z_]{1,3})?", fullmatch=True)
_code = st.lists(_code_line, min_size=0, max_size=4).map("\n".join)


@st.composite
def steps(draw, final: bool = False) -> Step:
    comment, code = draw(_comment), draw(_code)
    if not final:
        return Step(comment, code)
    output = draw(st.one_of(st.none(), _line))
    answer = draw(st.one_of(st.none(), _line.map(lambda s: s + " \\boxed{" + s.strip("{}\\") + "}")))
    if not (comment or code) and output is None and answer is None:
        answer = "\\boxed{1}"
    return Step(comment, code, is_final=True, output=output, answer=answer)


@given(steps())
def test_render_then_parse_gives_an_intermediate_step_back(step):
    assert parse_step(render_step(step)) == step


@given(steps(final=True))
def test_render_then_parse_gives_a_final_step_back(step):
    assert parse_step(render_step(step)) == step


@given(st.lists(steps(), max_size=5), steps(final=True))
def test_render_then_split_gives_the_whole_trajectory_back(middle, last):
    trajectory = [*middle, last]
    assert split_steps(render_steps(trajectory)) == trajectory


def test_intermediate_step_ends_with_the_step_marker_and_keeps_comment_and_code_apart():
    step = parse_step("# Step 1: Tom has 23 apples.\napples = 23\n<end_of_step>")
    assert step == Step(comment="Step 1: Tom has 23 apples.", code="apples = 23")
    assert not step.is_final


def test_step_that_closes_the_program_is_final_and_carries_output_and_answer():
    text = f"# add\nprint(2 + 3)\n{CODE_END}\n{OUTPUT_START}5<end_of_output>\n<answer>It is \\boxed{{5}}.{ANSWER_END}"
    step = parse_step(text)
    assert step.is_final
    assert step.code == "print(2 + 3)"
    assert step.output == "5"
    assert step.answer == "It is \\boxed{5}."


def test_answer_without_code_is_a_final_step():
    step = parse_step("<answer>\\boxed{7}<end_of_answer>")
    assert step.is_final and step.answer == "\\boxed{7}" and step.code == ""


def test_text_after_the_step_marker_is_not_part_of_the_step():
    step = parse_step("x = 1\n<end_of_step>\ny = 2\n<end_of_step>")
    assert step.code == "x = 1"


def test_leading_code_marker_is_ignored():
    assert parse_step("<code>\n# c\nx = 1\n<end_of_step>") == Step("c", "x = 1")


def test_cumulative_program_runs_steps_one_to_i_together():
    trajectory = [Step("start", "a = 20"), Step("add", "b = a + 7"), Step("show", "print(b)", is_final=True)]
    program = build_program(trajectory)
    assert program.index("a = 20") < program.index("b = a + 7") < program.index("print(b)")
    with PythonExecutor(max_workers=1) as executor:
        assert executor.run(program).output == "27\n"
        assert executor.run(build_program(trajectory[:2])).ok


def test_policy_prompt_holds_the_question_and_opens_the_program():
    prompt = format_prompt("What is 2 + 2?")
    assert "What is 2 + 2?" in prompt
    assert prompt.rstrip().endswith("<code>")


def test_custom_template_without_placeholder_is_rejected():
    with pytest.raises(ValueError, match="question"):
        format_prompt("x", template="no placeholder here")


def test_few_shot_prompt_has_worked_examples_in_the_step_format_and_ends_with_the_policy_prompt():
    instruction_only = few_shot_prompt(num_shots=0)
    assert FEW_SHOT_PROMPT.count(ANSWER_END) - instruction_only.count(ANSWER_END) == 2
    assert FEW_SHOT_PROMPT.count(STEP_END) - instruction_only.count(STEP_END) == 3
    assert FEW_SHOT_PROMPT.endswith(POLICY_PROMPT)
    with pytest.raises(ValueError):
        few_shot_prompt(num_shots=5)


def test_few_shot_examples_are_programs_that_print_their_stated_output():
    with PythonExecutor(max_workers=1) as executor:
        for example in FEW_SHOT_PROMPT.split("<code>\n")[1:-1]:
            example_steps = split_steps(example.split("<|user|>")[0])
            result = executor.run(build_program(example_steps))
            assert result.ok, result.error
            assert result.output.strip() == example_steps[-1].output


def test_render_trajectory_is_a_prompt_completion_pair():
    row = render_trajectory("Q?", [Step("c", "print(1)", is_final=True, output="1", answer="\\boxed{1}")])
    assert row["prompt"] == format_prompt("Q?")
    assert row["completion"].endswith(ANSWER_END)


def test_add_step_tokens_makes_each_marker_one_token_and_resizes_embeddings(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        ["x = 1 + 2", "print(x)"] * 50, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )  # fmt: skip
    )
    before = len(tokenizer)
    assert add_step_tokens(tokenizer, model) == len(STEP_MARKERS)
    assert len(tokenizer) == before + len(STEP_MARKERS)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    for marker in STEP_MARKERS:
        assert len(tokenizer(marker, add_special_tokens=False).input_ids) == 1
    assert add_step_tokens(tokenizer, model) == 0
