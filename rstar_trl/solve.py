r"""Test-time search: solve problems with a policy and its process preference model (paper §3 and §4, "inference";
docs/method.md §7 "Test-time search and answer selection").

Problems go in WITHOUT gold answers (a list of strings, or a `datasets.Dataset` with a `problem` column); for each
problem a `Solution` comes out: the answer, the chosen trajectory, every candidate trajectory with its scores, and
the tokens generated for the problem.

    >>> from rstar_trl.solve import Solver, SolverConfig
    >>> args = SolverConfig(model_name_or_path="runs/tiny/round_2/policy", ppm_path="runs/tiny/round_2/ppm",
    ...                     method="mcts@8x4x8:top4")
    >>> with Solver(args=args) as solver:
    ...     (solution,) = solver.solve(["What is 2 + 3?"])
    >>> solution.answer, solution.score, len(solution.candidates)

A method string names a method and its budget (`MethodSpec.parse`):

| method | what |
|---|---|
| `greedy` | one step-wise solution at temperature 0 |
| `maj@K` | K samples, majority vote (answers `grade_answer` calls equal count together) |
| `best_of_n@N[:AGG]` | N samples, the one with the best PPM trajectory score (AGG below; default `last`) |
| `weighted_maj@N` | N samples, PPM-weighted vote: weight (v + 1) / 2, v = the PPM's value of the solution |
| `mcts@RxC` | ONE PPM-guided search, R rollouts, C candidates per expansion; its best terminal's answer |
| `mcts@R`, `mcts` | the same with C = `num_candidates` (and R = `num_rollouts`) |
| `mcts@TxRxC[:SEL]` | T independent PPM-guided searches of R x C; SEL picks the answer (below; default `best`) |
| `beam@BxK` | step-level beam search with the PPM: width B, K candidates per beam and step |

AGG, the trajectory score of a sample for `best_of_n`: the PPM values every prefix (steps 1..i) of every sample in
ONE batched call, and the score is the value of the whole solution (`last`), the `min` or the `mean` of the step
values, or the product of their (v + 1) / 2 (`prod`).

SEL, the answer of T searches: each search contributes its best terminal (the highest PPM value, which is its
reward at test time) with that value as its score; `best` takes the highest score, `vote` is a PPM-weighted vote
(weight (v + 1) / 2 per search, summed over equivalent answers), `topK` (e.g. `top4`) a majority vote among the K
highest-scoring searches (K >= T: among all).

The paper's test-time setting is 64 searches ("64 trajectories") with 32 candidates per step, `mcts@64xRx32`; 8 or
16 searches lose under a point (§4; recipes/rstar-math/qwen2.5-math-7b/eval.yaml). A search runs in test-time mode:
Eq. 3 initialises new nodes and a terminal node's value is the PPM's value of the whole solution, backed up by Eq. 2
(docs/method.md §2, §7).

PPM values are in [-1, 1]. Where they become vote weights (`weighted_maj`, `mcts@...:vote`) or factors of a product
(`best_of_n@N:prod`) they are mapped to [0, 1] by (v + 1) / 2 (`ppm_weight`), so that a negative value counts less
than a positive one instead of subtracting, and a product of step values cannot flip sign.

Every solution is written step by step in the code-augmented format, exactly as the search writes it: a wave makes
ONE generation call for the next step of every unfinished solution, ONE `run_batch` for their cumulative programs,
and ONE generation call for the answers of the solutions that closed their program (after the executor's output).
A step that does not end with a marker or whose program fails is retried (at most `max_consecutive_errors` times in
a row; greedy decoding would repeat itself, so it stops at the first failure); a solution also ends at `max_depth`
steps or when the context is full. Steps are accepted by the search's rule (`rstar_trl.search.steps`).

Cost and sharing. Every method is charged ALL the tokens it generated for a problem, retried steps included.
Samples are seeded per (seed, problem, sample index, step, attempt): the first K of N samples are the K samples a run
with budget K draws, so `maj`, `best_of_n` and `weighted_maj` share one set of samples drawn at the largest budget,
and each uses (and is charged the tokens of) its first K or N. The T searches of `mcts@TxRxC` are ONE
`MCTSGenerator` run over the problems each repeated T times (row i*T + t is search t of problem i; the search seeds
derive from the row, so the T searches differ and none depends on batching); selections with the same TxRxC share
one set of searches, each charged all their tokens; `mcts@RxC` and `mcts@1xRxC` are the same single search (one run).
Different T do not share searches: search t of problem i is row i*T + t, so its seeds depend on T. Results depend on
the seed and on a problem's position in the input, never on `problems_in_flight` or batch sizes.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

from datasets import Dataset
from tqdm.auto import tqdm

from .closing import Closeable
from .executor import PythonExecutor
from .format import (
    ANSWER_STOP_STRINGS,
    OUTPUT_END,
    OUTPUT_START,
    STEP_STOP_STRINGS,
    Step,
    build_program,
    format_prompt,
    parse_step,
)
from .grading import extract_answer, grade_answer
from .search.backends import GenerationBackend, mix_seed
from .search.generator import MCTSConfig, MCTSGenerator, StepScorer, build_backend, process_device
from .search.steps import check_completion, check_execution, closes_program, needs_execution
from .search.tree import SearchTree

__all__ = [
    "AGGREGATIONS",
    "METHOD_FORMS",
    "BeamResult",
    "Candidate",
    "MethodResult",
    "MethodSpec",
    "Solution",
    "Solver",
    "SolverConfig",
    "TestTimeConfig",
    "Trajectory",
    "aggregate_step_scores",
    "beam_search",
    "build_ppm_scorer",
    "majority_vote",
    "ppm_weight",
    "propose_steps",
    "sample_solutions",
    "select_answer",
    "select_top",
    "solutions_to_dataset",
    "weighted_vote",
]

logger = logging.getLogger(__name__)

METHODS = ("greedy", "maj", "best_of_n", "weighted_maj", "mcts", "beam")
PPM_METHODS = ("best_of_n", "weighted_maj", "mcts", "beam")
SAMPLE_METHODS = ("maj", "best_of_n", "weighted_maj")
AGGREGATIONS = ("last", "min", "mean", "prod")
SELECTIONS = ("best", "vote", "topK")
METHOD_FORMS = (
    "greedy, maj@K, best_of_n@N[:last|min|mean|prod], weighted_maj@N, mcts, mcts@R, mcts@RxC, "
    "mcts@TxRxC[:best|vote|topK], beam@BxK"
)
_METHOD_RE = re.compile(r"^(?P<name>[a-z_]+)(?:@(?P<budget>\d+(?:x\d+)*))?(?::(?P<rule>[a-z0-9]+))?$")
# Seed streams: sampled solutions and beam candidates never share random numbers.
_SAMPLE_STREAM, _BEAM_STREAM = 1, 2


# -- method strings -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One method and its budget, parsed from a method string (`maj@8`, `best_of_n@16:min`, `mcts@16x8`,
    `mcts@64x8x32:top4`, `beam@4x4`, ...; the forms are in the module docstring).

    Args:
        name: "greedy", "maj", "best_of_n", "weighted_maj", "mcts" or "beam".
        budget: () for greedy; (K,) for maj; (N,) for best_of_n and weighted_maj; (rollouts, candidates) for one
            search; (searches, rollouts, candidates) for T searches; (beam width, candidates per beam) for beam.
        rule: best_of_n: the aggregation of step scores ("min", "mean", "prod"; None = "last"); T searches: the
            answer selection ("vote", "topK"; None = "best").
    """

    name: str
    budget: tuple[int, ...] = ()
    rule: str | None = None

    @classmethod
    def parse(cls, text: str, default_rollouts: int = 8, default_candidates: int = 5) -> MethodSpec:
        """Parse a method string; `mcts` alone takes (default_rollouts, default_candidates), `mcts@R` takes
        default_candidates. Raises ValueError naming the string and the accepted forms."""
        if isinstance(text, MethodSpec):
            return text
        match = _METHOD_RE.match(str(text).strip())
        name = match["name"] if match else None
        if name not in METHODS:
            raise ValueError(f"unknown method {text!r}: use one of {METHOD_FORMS}")
        numbers = tuple(int(b) for b in match["budget"].split("x")) if match["budget"] else ()
        rule = match["rule"]
        sizes = {"greedy": (0,), "maj": (1,), "best_of_n": (1,), "weighted_maj": (1,), "mcts": (0, 1, 2, 3),
                 "beam": (2,)}  # fmt: skip
        if len(numbers) not in sizes[name] or any(b < 1 for b in numbers):
            raise ValueError(f"bad budget in method {text!r}: use one of {METHOD_FORMS} (budgets >= 1)")
        if name == "best_of_n":
            if rule is not None and rule not in AGGREGATIONS:
                raise ValueError(
                    f"bad aggregation in method {text!r}: best_of_n@N takes :last, :min, :mean or :prod "
                    f"(forms: {METHOD_FORMS})"
                )
            rule = None if rule == "last" else rule
        elif name == "mcts":
            if len(numbers) < 3:
                if rule is not None:
                    raise ValueError(
                        f"bad method {text!r}: an answer selection needs T searches, as in mcts@TxRxC:{rule} "
                        f"(forms: {METHOD_FORMS})"
                    )
                numbers = (numbers + (default_rollouts, default_candidates)[len(numbers) :])[:2]
            elif rule is not None and rule not in ("best", "vote") and not re.fullmatch(r"top[1-9]\d*", rule):
                raise ValueError(
                    f"bad answer selection in method {text!r}: mcts@TxRxC takes :best, :vote or :topK with K >= 1 "
                    f"(e.g. :top4; forms: {METHOD_FORMS})"
                )
            else:
                rule = None if rule == "best" else rule
        elif rule is not None:
            raise ValueError(f"method {text!r} takes no ':{rule}' rule: use one of {METHOD_FORMS}")
        return cls(name, numbers, rule)

    @property
    def label(self) -> str:
        """The canonical method string (defaults written out only where they disambiguate: `mcts@TxRxC:best`)."""
        text = self.name if not self.budget else f"{self.name}@{'x'.join(str(b) for b in self.budget)}"
        rule = self.selection if self.name == "mcts" and len(self.budget) == 3 else self.rule
        return f"{text}:{rule}" if rule else text

    @property
    def family(self) -> str:
        """The method without its budget (one line of the accuracy-vs-tokens plot): `best_of_n:min`, `mcts:topK`."""
        if self.name == "mcts" and len(self.budget) == 3:
            return "mcts:topK" if self.selection.startswith("top") else f"mcts:{self.selection}"
        return f"{self.name}:{self.rule}" if self.rule else self.name

    @property
    def needs_ppm(self) -> bool:
        return self.name in PPM_METHODS

    @property
    def num_samples(self) -> int:
        """Samples a maj / best_of_n / weighted_maj method uses."""
        return self.budget[0] if self.name in SAMPLE_METHODS else 0

    @property
    def search_budget(self) -> tuple[int, int, int]:
        """(searches, rollouts, candidates) of an mcts method (one search for mcts@RxC)."""
        return self.budget if len(self.budget) == 3 else (1, *self.budget)

    @property
    def aggregation(self) -> str:
        """best_of_n: how step scores make a trajectory score ("last", "min", "mean", "prod")."""
        return self.rule or "last"

    @property
    def selection(self) -> str:
        """mcts: how the answer is picked among the T searches ("best", "vote", "topK")."""
        return self.rule or "best"


def parse_methods(methods: Sequence[str | MethodSpec], default_rollouts: int = 8,
                  default_candidates: int = 5) -> list[MethodSpec]:  # fmt: skip
    """Parse method strings; a method given twice (the same canonical label) is an error naming it."""
    if isinstance(methods, (str, MethodSpec)):
        methods = [methods]
    specs = [MethodSpec.parse(m, default_rollouts, default_candidates) for m in methods]
    labels = [spec.label for spec in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"method(s) {repeated} given twice")
    return specs


# -- settings -------------------------------------------------------------------------------------------------


@dataclass
class TestTimeConfig(MCTSConfig):
    """The policy, the PPM, and the search and generation settings of `MCTSConfig` (same names, same meaning;
    `temperature`/`top_p` apply to every sampled method, `num_rollouts`/`num_candidates` are the budget of a bare
    `mcts`; `problems_in_flight` counts trees, so each of a problem's T searches is one). Shared by `SolverConfig`
    and `EvalConfig`.

    > Parameters that control the models

    Args:
        model_name_or_path: the policy checkpoint (path or Hub id).
        ppm_path: the PPM checkpoint (needed by best_of_n, weighted_maj, mcts and beam, unless `ppm_server_url`
            serves it; then a local copy of the served checkpoint to read its tokenizer and config from).
        ppm_server_url: a `vllm serve --runner pooling` server of the PPM (`ServerPPMScorer`), instead of loading it.
        ppm_server_model: the PPM's name on that server (default: the first it serves).
        ppm_backend: "transformers" or "vllm" (vLLM's pooling runner).
        ppm_batch_size: texts per PPM forward pass (transformers), or per request to the PPM server.
        ppm_gpu_memory_utilization: share of GPU memory the vLLM PPM engine reserves.
        ppm_max_length: tokens of a PPM input kept (the last ones).
    """

    __test__ = False  # not a pytest test class

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy checkpoint (path or Hub id), e.g. runs/tiny/round_2/policy."}
    )
    ppm_path: str | None = field(
        default=None,
        metadata={"help": "PPM checkpoint (path or Hub id), needed by best_of_n, weighted_maj, mcts and beam, e.g. "
                  "runs/tiny/round_2/ppm. With --ppm_server_url: where to read the served PPM's tokenizer and config "
                  "(default: the path the server reports)."},
    )  # fmt: skip
    ppm_server_url: str | None = field(
        default=None,
        metadata={"help": "Score with a PPM served by `vllm serve <ppm> --runner pooling` at this URL (e.g. "
                  "http://host:8001) instead of loading it: many processes share one PPM. Texts are tokenised "
                  "here and sent as token ids; values match the in-process scorers."},
    )  # fmt: skip
    ppm_server_model: str | None = field(
        default=None, metadata={"help": "--ppm_server_url: the PPM's name on the server (default: the first served)."}
    )
    ppm_backend: str = field(
        default="transformers",
        metadata={
            "help": "PPM engine: 'transformers' or 'vllm' (pooling runner).",
            "choices": ["transformers", "vllm"],
        },
    )
    ppm_batch_size: int = field(
        default=32, metadata={"help": "Texts per PPM forward pass (transformers), or per request (--ppm_server_url)."}
    )
    ppm_gpu_memory_utilization: float = field(
        default=0.2,
        metadata={"help": "ppm_backend='vllm': share of GPU memory the PPM engine reserves (it shares the GPU with "
                  "the policy's engine: keep the two --*gpu_memory_utilization under 1 together)."},
    )  # fmt: skip
    ppm_max_length: int = field(default=2048, metadata={"help": "Tokens of a PPM input kept (the last ones)."})

    def __post_init__(self):
        super().__post_init__()
        if self.unsolved_rollouts:
            raise ValueError(
                f"unsolved_rollouts={self.unsolved_rollouts}: extra passes search the problems a pass left unsolved "
                "again, which needs gold answers; test-time search has none, so leave it empty"
            )
        if self.ppm_backend not in ("transformers", "vllm"):
            raise ValueError(f"ppm_backend must be 'transformers' or 'vllm', got {self.ppm_backend!r}")
        if self.ppm_server_url and self.ppm_backend != "transformers":
            raise ValueError(
                f"--ppm_server_url scores with the PPM server, --ppm_backend {self.ppm_backend} would load the PPM "
                "here too: drop one of them"
            )
        if self.ppm_server_model and not self.ppm_server_url:
            raise ValueError("--ppm_server_model names the PPM on a server: it needs --ppm_server_url")

    def mcts_config(self, num_rollouts: int, num_candidates: int) -> MCTSConfig:
        """The `MCTSConfig` of one search: these settings with its budget (no shards: nothing to resume)."""
        settings = {f.name: getattr(self, f.name) for f in fields(MCTSConfig)}
        return MCTSConfig(**{**settings, "num_rollouts": num_rollouts, "num_candidates": num_candidates,
                             "output_dir": None})  # fmt: skip

    def parse_methods(self, methods: Sequence[str | MethodSpec]) -> list[MethodSpec]:
        """Parse method strings (bare `mcts` takes `num_rollouts` x `num_candidates`) and check that a PPM is
        configured for the methods that need one."""
        specs = parse_methods(methods, self.num_rollouts, self.num_candidates)
        needing = [spec.label for spec in specs if spec.needs_ppm]
        if needing and not (self.ppm_path or self.ppm_server_url):
            raise ValueError(
                f"method(s) {needing} need a process preference model: pass --ppm_path (a PPMTrainer checkpoint, "
                "e.g. runs/tiny/round_2/ppm) or --ppm_server_url (a `vllm serve --runner pooling` of one), or drop "
                "them (greedy and maj@K need no PPM)"
            )
        return specs


@dataclass
class SolverConfig(TestTimeConfig):
    """Settings of `Solver`: the method that solves (with its budget), the models, and the search and generation
    settings (`TestTimeConfig`, `MCTSConfig`).

    Args:
        method: the method string `Solver.solve` uses (forms: the module docstring).
    """

    method: str = field(
        default="mcts@8x8x16:best",
        metadata={"help": f"Method with its budget: {METHOD_FORMS}. mcts@TxRxC:SEL runs T independent PPM-guided "
                  "searches of R rollouts x C candidates and picks the answer by SEL (best PPM score, PPM-weighted "
                  "vote, or majority vote among the top K searches); the paper uses 64 searches, 32 candidates per "
                  "step (§4)."},
    )  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        MethodSpec.parse(self.method, self.num_rollouts, self.num_candidates)  # raises on a bad method string


# -- results --------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One candidate trajectory of a problem.

    Args:
        text: the solution (completion after the prompt), as the search writes it; None when a search found none.
        answer: its extracted final answer (None: no answer).
        score: the trajectory score the method ranks by: the PPM's value of the whole solution (a search's best
            terminal reward, best_of_n `last`, beam), or the aggregation of `step_scores` (best_of_n min/mean/prod);
            None when not scored (greedy, maj, unanswered samples).
        step_scores: the PPM's value of every prefix (steps 1..i), when scored step by step.
        tokens: tokens generated for this candidate (samples, greedy); None where only the problem's total is
            known (searches, beams).
        end: why it ended: "answer", "max_depth", "errors", "context_full" (samples); a search's status
            ("searched", "prompt_too_long").
    """

    text: str | None
    answer: str | None
    score: float | None = None
    step_scores: list[float] | None = None
    tokens: int | None = None
    end: str | None = None


@dataclass
class Solution:
    """The outcome of one method on one problem.

    Args:
        index: the problem's position in the input.
        problem: the problem text.
        method: the method's label (e.g. "mcts@64x8x32:best").
        answer: the chosen final answer (None when no candidate has one).
        trajectory: the chosen candidate's text.
        score: the chosen candidate's score (see `Candidate.score`).
        chosen: index of the chosen candidate in `candidates`.
        votes: vote rules: the votes (count, or summed weight) of the chosen answer.
        tokens: ALL tokens generated for this problem by this method.
        candidates: every candidate trajectory (samples, searches' best terminals, finished beams).
        info: method-specific details (e.g. "end", "status", "finished_beams").
    """

    index: int
    problem: str
    method: str
    answer: str | None
    trajectory: str | None
    score: float | None
    chosen: int | None
    votes: float | None
    tokens: int
    candidates: list[Candidate] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MethodResult:
    """One method's solutions of all problems, and the time charged to it: its own work plus its share of work it
    shares with other methods (samples, their scores, searches) — about what it would take alone."""

    spec: MethodSpec
    solutions: list[Solution]
    time_s: float

    @property
    def method(self) -> str:
        return self.spec.label


def solutions_to_dataset(solutions: Sequence[Solution]) -> Dataset:
    """The solutions as a `datasets.Dataset`, one row per problem (candidates as a list of structs)."""
    return Dataset.from_list([s.to_dict() for s in solutions])


# -- step-wise solutions --------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """One solution being written (or written) step by step.

    Args:
        problem: index of its problem.
        sample: index of the sample (or beam slot) within its problem.
        prompt: the policy prompt (question included).
        text: the solution so far, as the search writes it (a final step also holds the output block and answer).
        steps: its parsed steps.
        step_ends: where each step ends in `text` (`text[:step_ends[i]]` is the prefix of steps 1..i+1).
        tokens: tokens generated for it, failed attempts included.
        failures: failed attempts at the next step in a row.
        end: why it ended: "answer", "max_depth", "errors", "context_full" (None while unfinished).
        answer: the extracted final answer.
        score: the PPM's value of the whole text, when scored.
        step_scores: the PPM's value of every prefix, when scored step by step.
    """

    problem: int
    sample: int
    prompt: str
    text: str = ""
    steps: list[Step] = field(default_factory=list)
    step_ends: list[int] = field(default_factory=list)
    tokens: int = 0
    failures: int = 0
    end: str | None = None
    answer: str | None = None
    score: float | None = None
    step_scores: list[float] | None = None

    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def prefixes(self) -> list[str]:
        """The partial solutions after each step (the last one is `text`)."""
        return [self.text[:end] for end in self.step_ends]


@dataclass
class _Proposal:
    """A candidate next step of a trajectory: valid (`error` is None) or why not."""

    text: str
    tokens: int
    step: Step | None = None
    error: str | None = None
    output: str = ""

    @property
    def final(self) -> bool:
        return self.step is not None and self.step.is_final


def propose_steps(
    backend: GenerationBackend,
    executor: PythonExecutor,
    args: MCTSConfig,
    trajectories: Sequence[Trajectory],
    n: int,
    temperature: float,
    seeds: Sequence[int],
) -> list[list[_Proposal]]:
    """`n` candidate next steps of every trajectory: ONE step generation call, ONE `run_batch`, ONE answer generation
    call for the candidates that closed their program. A candidate is invalid (`error` set to the reason) by the rule
    the search uses too (`rstar_trl.search.steps`): no step marker, an empty step, an answer without a closed and
    executed program (unless `args.allow_unexecuted_answers`), a failing program, a closed program printing nothing."""
    samples = backend.generate(
        [t.prompt + t.text for t in trajectories], n, STEP_STOP_STRINGS, args.max_step_tokens, temperature,
        args.top_p, seeds,
    )  # fmt: skip
    proposals: list[list[_Proposal]] = []
    to_run: list[tuple[_Proposal, str]] = []
    for trajectory, completions in zip(trajectories, samples):
        row = []
        for completion in completions:
            step, error = check_completion(completion, args.allow_unexecuted_answers)
            text = "" if error == "context_full" else completion.text
            proposal = _Proposal(text, completion.num_tokens, step, error)
            if error is None and needs_execution(completion.text):
                to_run.append((proposal, build_program([*trajectory.steps, step])))
            row.append(proposal)
        proposals.append(row)
    for (proposal, _), result in zip(to_run, executor.run_batch([program for _, program in to_run])):
        proposal.output = result.output
        proposal.error = check_execution(proposal.step, result)
    closed = [
        (i, j)
        for i, row in enumerate(proposals)
        for j, p in enumerate(row)
        if p.error is None and closes_program(p.text)
    ]
    for i, j in closed:
        p = proposals[i][j]
        p.text = f"{p.text}\n{OUTPUT_START}{p.output.strip()}{OUTPUT_END}\n"
    if closed:
        answers = backend.generate(
            [trajectories[i].prompt + trajectories[i].text + proposals[i][j].text for i, j in closed], 1,
            ANSWER_STOP_STRINGS, args.max_answer_tokens, temperature, args.top_p,
            [mix_seed(seeds[i], j, 1) for i, j in closed],
        )  # fmt: skip
        for (i, j), (answer,) in zip(closed, answers):
            proposals[i][j].text += answer.text
            proposals[i][j].tokens += answer.num_tokens
    for row in proposals:
        for p in row:
            if p.error is None:
                p.step = parse_step(p.text)
                if not p.final:
                    p.text += "\n"  # as MCTS stores a step: the next one starts on a new line
    return proposals


def _accept(trajectory: Trajectory, proposal: _Proposal, max_depth: int) -> None:
    """Append a valid step; the trajectory ends at an answer or at max_depth."""
    trajectory.text += proposal.text
    trajectory.steps.append(proposal.step)
    trajectory.step_ends.append(len(trajectory.text))
    trajectory.failures = 0
    if proposal.final:
        trajectory.end = "answer"
        trajectory.answer = extract_answer(proposal.step.answer or "")
    elif trajectory.depth >= max_depth:
        trajectory.end = "max_depth"


def _waves(num_problems: int, limit: int, desc: str) -> Iterator[list[int]]:
    """The problems in flight, wave by wave: at most `limit` at once, started in index order, refilled as others
    finish. Each wave yields the list of problems in flight; the caller removes the finished ones from it in place,
    and the progress bar counts them."""
    queue = deque(range(num_problems))
    active: list[int] = []
    with tqdm(total=num_problems, desc=desc, unit="problem") as progress:
        while queue or active:
            while queue and len(active) < limit:
                active.append(queue.popleft())
            in_flight = len(active)
            yield active
            progress.update(in_flight - len(active))


def sample_solutions(
    backend: GenerationBackend,
    executor: PythonExecutor,
    args: MCTSConfig,
    prompts: Sequence[str],
    num_samples: int,
    temperature: float,
    desc: str = "sampling",
    problems: Sequence[int] | None = None,
) -> list[list[Trajectory]]:
    """`num_samples` step-wise solutions of every prompt (result[i][j]: sample j of prompt i), or of the prompts
    `problems` lists (result[k]: the samples of prompt problems[k]; a sample's seeds depend on its prompt's index,
    so a problem gets the same samples in any subset). Up to `args.problems_in_flight` problems are in flight; each
    wave advances all their unfinished solutions by one step with one generation call, one `run_batch` and one
    answer call."""
    problems = range(len(prompts)) if problems is None else problems
    results = [[Trajectory(i, j, prompts[i]) for j in range(num_samples)] for i in problems]
    for active in _waves(len(results), args.problems_in_flight, desc):
        live = [t for i in active for t in results[i] if t.end is None]
        seeds = [mix_seed(args.seed, _SAMPLE_STREAM, t.problem, t.sample, t.depth, t.failures) for t in live]
        for trajectory, (proposal,) in zip(live, propose_steps(backend, executor, args, live, 1, temperature, seeds)):
            trajectory.tokens += proposal.tokens
            if proposal.error is None:
                _accept(trajectory, proposal, args.max_depth)
            elif proposal.error == "context_full":
                trajectory.end = "context_full"
            else:
                trajectory.failures += 1
                # Greedy decoding would write the same failing step again.
                if trajectory.failures >= args.max_consecutive_errors or temperature == 0:
                    trajectory.end = "errors"
        active[:] = [i for i in active if any(t.end is None for t in results[i])]
    return results


def select_top(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the `k` highest scores, best first (ties: the earlier index)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: max(k, 0)]


@dataclass
class BeamResult:
    """The outcome of one problem's beam search: the finished beams (with PPM scores), the best one, tokens."""

    finished: list[Trajectory]
    tokens: int
    best: Trajectory | None


def beam_search(
    backend: GenerationBackend,
    executor: PythonExecutor,
    scorer: StepScorer,
    args: MCTSConfig,
    questions: Sequence[str],
    width: int,
    num_candidates: int,
    desc: str = "beam search",
    problems: Sequence[int] | None = None,
) -> list[BeamResult]:
    """Step-level beam search with the PPM. Every wave, each live beam of every problem proposes `num_candidates`
    next steps (one generation call, one `run_batch`, one answer call for all problems); ONE PPM call scores every
    valid candidate (prefix + step); per problem the top candidates by score fill the free slots, and those that
    end (an answer, or max_depth) leave the beam. A problem starts with `width` slots and ends when every slot has
    ended, or after `max_consecutive_errors` waves in a row without a valid candidate. The answer is that of the
    finished beam with the highest PPM score. With `problems`, only those questions are searched (result[k]: the
    search of questions[problems[k]], seeded by that index, so it is the same in any subset)."""
    problems = list(range(len(questions)) if problems is None else problems)
    questions = [questions[i] for i in problems]
    prompts = [format_prompt(q, args.template) for q in questions]
    # Inside, problems are numbered by position; seeds use the index in the caller's list.
    beams = [[Trajectory(i, 0, prompts[i])] for i in range(len(prompts))]
    ended: list[list[Trajectory]] = [[] for _ in prompts]
    tokens = [0] * len(prompts)
    failures = [0] * len(prompts)
    for active in _waves(len(prompts), args.problems_in_flight, desc):
        live = [beam for i in active for beam in beams[i]]
        seeds = [mix_seed(args.seed, _BEAM_STREAM, problems[b.problem], b.depth, b.sample, failures[b.problem])
                 for b in live]  # fmt: skip
        proposals = propose_steps(backend, executor, args, live, num_candidates, args.temperature, seeds)
        pools: dict[int, list[Trajectory]] = {i: [] for i in active}
        for beam, row in zip(live, proposals):
            seen = {t.text for t in pools[beam.problem]}
            for proposal in row:
                tokens[beam.problem] += proposal.tokens
                if proposal.error is not None or beam.text + proposal.text in seen:
                    continue
                child = Trajectory(beam.problem, 0, beam.prompt, beam.text, list(beam.steps), list(beam.step_ends))
                _accept(child, proposal, args.max_depth)
                seen.add(child.text)
                pools[beam.problem].append(child)
        candidates = [t for i in active for t in pools[i]]
        if candidates:  # ONE scoring call for all problems
            scores = scorer.score([questions[t.problem] for t in candidates], [t.text for t in candidates])
            for trajectory, score in zip(candidates, scores):
                trajectory.score = float(score)
        still_active = []
        for i in active:
            pool = pools[i]
            if not pool:
                failures[i] += 1
                if failures[i] < args.max_consecutive_errors:
                    still_active.append(i)
                continue
            failures[i] = 0
            kept = [pool[k] for k in select_top([t.score for t in pool], width - len(ended[i]))]
            beams[i] = [t for t in kept if t.end is None]
            for slot, beam in enumerate(beams[i]):
                beam.sample = slot
            ended[i] += [t for t in kept if t.end is not None]
            if beams[i]:
                still_active.append(i)
        active[:] = still_active
    results = []
    for i in range(len(prompts)):
        for t in ended[i]:
            t.problem = problems[i]
        finished = [t for t in ended[i] if t.end == "answer"]
        best = max(finished, key=lambda t: t.score, default=None)
        results.append(BeamResult(finished, tokens[i], best))
    return results


# -- answer selection -----------------------------------------------------------------------------------------


def ppm_weight(value: float) -> float:
    """A PPM value in [-1, 1] as a non-negative weight in [0, 1]: (v + 1) / 2 (clipped). Used by the weighted votes
    and by the product of step scores, so that a low value counts less instead of subtracting or flipping a sign."""
    return min(1.0, max(0.0, (float(value) + 1.0) / 2.0))


def aggregate_step_scores(step_scores: Sequence[float], how: str = "last") -> float:
    """A trajectory score from the PPM's values of its prefixes (steps 1..i, in order): "last" (the value of the
    whole solution), "min", "mean", or "prod" (the product of `ppm_weight(v)`, in [0, 1])."""
    if not step_scores:
        raise ValueError("aggregate_step_scores needs at least one step score")
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "mean":
        return float(sum(step_scores) / len(step_scores))
    if how == "prod":
        product = 1.0
        for value in step_scores:
            product *= ppm_weight(value)
        return product
    raise ValueError(f"unknown aggregation {how!r}: use one of {list(AGGREGATIONS)}")


def _answer_groups(answers: Sequence[str | None]) -> list[int | None]:
    """The group of every answer (None for no answer): answers are grouped by their whitespace-free text first, then
    a new text joins the first group whose representative it grades equal to (`grade_answer`). Groups are numbered
    in order of their first answer."""
    representatives: list[str] = []
    group_of_text: dict[str, int] = {}
    groups: list[int | None] = []
    for answer in answers:
        if answer is None:
            groups.append(None)
            continue
        key = re.sub(r"\s+", "", answer)
        group = group_of_text.get(key)
        if group is None:
            group = next((g for g, rep in enumerate(representatives) if grade_answer(answer, rep)), None)
            if group is None:
                group = len(representatives)
                representatives.append(answer)
            group_of_text[key] = group
        groups.append(group)
    return groups


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """The index of the first answer of the largest group of equal answers, or None when no sample has one.

    Answers are grouped by their whitespace-free text first, then a new text joins the first group whose
    representative it grades equal to (`grade_answer`), so `2`, `2.0` and `\\frac{4}{2}` are one vote. Ties go to the
    group whose first answer came first."""
    return weighted_vote(answers, [1.0] * len(answers))


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> int | None:
    """The index of the highest-weighted answer of the group of equal answers (grouped as `majority_vote` does)
    with the largest summed weight, or None when no candidate has an answer. Ties between groups go to the group
    whose first answer came first; within the group, to the earlier answer. Weights must be >= 0 (map PPM values
    with `ppm_weight`)."""
    if len(weights) != len(answers):
        raise ValueError(f"weighted_vote got {len(answers)} answers and {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError("weighted_vote needs non-negative weights (map PPM values in [-1, 1] with ppm_weight)")
    groups = _answer_groups(answers)
    totals: dict[int, float] = {}
    for group, weight in zip(groups, weights):
        if group is not None:
            totals[group] = totals.get(group, 0.0) + float(weight)
    if not totals:
        return None
    winner = max(totals, key=lambda g: (totals[g], -g))
    members = [i for i, g in enumerate(groups) if g == winner]
    return max(members, key=lambda i: (weights[i], -i))


def select_answer(candidates: Sequence[Candidate], selection: str) -> tuple[int | None, float | None]:
    """Pick a candidate by an answer-selection rule; returns (index, votes). Only candidates with an answer count.

    - "best": the highest score (ties: the earlier candidate); votes None.
    - "vote": PPM-weighted vote, each candidate weighing `ppm_weight(score)`; the winner's highest-scoring member.
    - "topK" (e.g. "top4"): majority vote among the K highest-scoring candidates; the winning answer's
      highest-scoring member (ties between answers: the one whose best member scores higher).
    - "majority": majority vote among all (scores unused); the first member of the winning answer."""
    answered = [i for i, c in enumerate(candidates) if c.answer is not None]
    if selection in ("best", "vote") or selection.startswith("top"):
        answered = [i for i in answered if candidates[i].score is not None]
    if not answered:
        return None, None
    if selection == "best":
        return max(answered, key=lambda i: (candidates[i].score, -i)), None
    if selection == "majority":
        pick = majority_vote([candidates[i].answer for i in answered])
        chosen = answered[pick]
        groups = _answer_groups([candidates[i].answer for i in answered])
        return chosen, sum(g == groups[pick] for g in groups)
    if selection == "vote":
        weights = [ppm_weight(candidates[i].score) for i in answered]
        pick = weighted_vote([candidates[i].answer for i in answered], weights)
        groups = _answer_groups([candidates[i].answer for i in answered])
        return answered[pick], sum(w for w, g in zip(weights, groups) if g == groups[pick])
    match = re.fullmatch(r"top([1-9]\d*)", selection)
    if not match:
        raise ValueError(f"unknown answer selection {selection!r}: use best, vote, majority or topK (e.g. top4)")
    top = [answered[k] for k in select_top([candidates[i].score for i in answered], int(match[1]))]
    pick = majority_vote([candidates[i].answer for i in top])  # in score order: the group's first is its best
    groups = _answer_groups([candidates[i].answer for i in top])
    return top[pick], sum(g == groups[pick] for g in groups)


# -- token metering -------------------------------------------------------------------------------------------


class _TokenMeter(GenerationBackend):
    """A backend that passes every call through and charges each completion's tokens to the problem whose prompt
    the request extends (MCTS reports only a total).

    It meters per PROBLEM, by prompt text: the T searches of a problem (identical prompts) all count for it, which is
    what a method is charged. Identical problems given twice cannot be told apart by their prompts; they share their
    tokens evenly (`tokens`)."""

    def __init__(self, backend: GenerationBackend, prompts: Sequence[str]):
        self.backend = backend
        self._group_of_prompt: dict[str, int] = {}
        self._members: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            group = self._group_of_prompt.setdefault(prompt, len(self._members))
            if group == len(self._members):
                self._members.append([])
            self._members[group].append(i)
        self._group_tokens = [0] * len(self._members)
        self._num_problems = len(prompts)
        self._lengths = sorted({len(p) for p in prompts}, reverse=True)

    @property
    def tokens(self) -> list[int]:
        """Tokens generated per problem (identical problems split their group's tokens evenly)."""
        per_problem = [0] * self._num_problems
        for members, total in zip(self._members, self._group_tokens):
            share, rest = divmod(total, len(members))
            for k, i in enumerate(members):
                per_problem[i] = share + (1 if k < rest else 0)
        return per_problem

    @property
    def max_context(self) -> int | None:
        return self.backend.max_context

    def count_tokens(self, texts):
        return self.backend.count_tokens(texts)

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        results = self.backend.generate(prompts, n, stop, max_new_tokens, temperature, top_p, seed)
        for prompt, completions in zip(prompts, results):
            group = next(
                (g for length in self._lengths if (g := self._group_of_prompt.get(prompt[:length])) is not None),
                None,
            )
            if group is not None:
                self._group_tokens[group] += sum(c.num_tokens for c in completions)
        return results


# -- the solver -----------------------------------------------------------------------------------------------


def build_ppm_scorer(args: TestTimeConfig) -> StepScorer:
    """The PPM scorer `args` describes (`ppm_server_url`, else `ppm_path` with `ppm_backend`, ...)."""
    if args.ppm_server_url:
        from .ppm import ServerPPMScorer

        return ServerPPMScorer(
            args.ppm_server_url, model=args.ppm_server_model, checkpoint=args.ppm_path,
            max_length=args.ppm_max_length, prompt_template=args.template, batch_size=args.ppm_batch_size,
            max_retries=args.server_max_retries,
        )  # fmt: skip
    if not args.ppm_path:
        raise ValueError(
            "this method needs a process preference model: pass --ppm_path or --ppm_server_url (or a scorer as ppm=)"
        )
    from .ppm import load_ppm_scorer

    return load_ppm_scorer(args.ppm_path, args.ppm_backend, **ppm_scorer_options(args, args.template))


def ppm_scorer_options(args, prompt_template: str) -> dict:
    """The options of the PPM scorer `args.ppm_backend` builds (`load_ppm_scorer`), from settings named like
    `TestTimeConfig`'s: ppm_max_length, and ppm_batch_size, device and prefix_cache_mb (transformers) or
    ppm_gpu_memory_utilization and dtype (vLLM)."""
    options = {"max_length": args.ppm_max_length, "prompt_template": prompt_template}
    if args.ppm_backend == "vllm":
        return {**options, "gpu_memory_utilization": args.ppm_gpu_memory_utilization, "dtype": args.dtype}
    options.update(device=args.device, batch_size=args.ppm_batch_size)
    if hasattr(args, "prefix_cache_mb"):  # a search's settings (MCTSConfig); else the scorer's default
        options["prefix_cache_mb"] = args.prefix_cache_mb
    return options


class _Shared:
    """Work several methods of one `Solver.iter_solve` call share: samples (drawn once at the largest budget), their
    PPM scores, and the searches of each TxRxC; with the time each took."""

    def __init__(self, specs: Sequence[MethodSpec]):
        self.num_samples = max((s.num_samples for s in specs), default=0)
        self.step_scores_needed = any(s.name == "best_of_n" and s.aggregation != "last" for s in specs)
        self.samples: list[list[Trajectory]] | None = None
        self.samples_time = 0.0
        self.scores_time: float | None = None
        self.searches: dict[tuple[int, int, int], tuple[list[list[Candidate]], list[int], float]] = {}
        self.time = 0.0  # seconds spent on shared work so far


class Solver(Closeable):
    """Solve problems with a policy and its PPM by a test-time method (paper §3, §4; docs/method.md §7).

    Args:
        model: the policy: a path or Hub id, a loaded causal LM (with `processing_class`), or a `GenerationBackend`.
            Default: `args.model_name_or_path`.
        ppm: a `StepScorer` (e.g. `TransformersPPMScorer`; values in [-1, 1]). Default: built from `args`
            (`ppm_server_url`, else `ppm_path`) on first use by a method that needs one.
        args: the settings (`SolverConfig`, or any `TestTimeConfig` such as `EvalConfig`).
        processing_class: the tokenizer of a loaded model.

    Under `accelerate launch --num_processes N`, every process must make the same calls: each solves every N-th
    problem and every process returns all the solutions (the same as one process would: seeds follow problems).

    Example:
        >>> with Solver("runs/tiny/round_2/policy", args=SolverConfig(ppm_path="runs/tiny/round_2/ppm")) as solver:
        ...     solutions = solver.solve(["What is 2 + 3?"], method="mcts@8x4x8:vote")
        ...     runs = solver.solve_methods(problems, ["maj@16", "best_of_n@16:min", "mcts@4x4x4:top2"])
    """

    def __init__(self, model=None, ppm: StepScorer | None = None, args: TestTimeConfig | None = None,
                 processing_class=None):  # fmt: skip
        self.args = args if args is not None else SolverConfig()
        if not isinstance(self.args, TestTimeConfig):
            raise TypeError(f"args must be a SolverConfig (or another TestTimeConfig), got {type(self.args).__name__}")
        model = model if model is not None else self.args.model_name_or_path
        if model is None:
            raise ValueError("no policy: pass a model or --model_name_or_path (e.g. runs/tiny/round_2/policy)")
        self.model_name = model if isinstance(model, str) else type(model).__name__
        import torch
        from accelerate import PartialState

        # Under `accelerate launch --num_processes N`, every method solves every N-th problem in each process (on
        # its own GPU, where there are several) and the processes exchange their results: each returns them all.
        # Seeds depend on a problem's index, never on its process, so the results are those of one process.
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.backend = build_backend(model, self.args, processing_class, process_device(self.state, self.args, model))
        self._owns_backend = self.backend is not model
        self._ppm = ppm
        self._owns_ppm = False

    @property
    def ppm(self) -> StepScorer:
        """The PPM scorer, built from `args` (`build_ppm_scorer`) on first use."""
        if self._ppm is None:
            self._ppm = build_ppm_scorer(self.args)
            self._owns_ppm = True
        return self._ppm

    def close(self) -> None:
        """Release the engines this solver built (policy backend, PPM scorer); ones passed in are left to their owner.
        Also done on leaving a `with Solver(...) as solver:` block."""
        if self._owns_backend:
            self.backend.close()
            self._owns_backend = False
        if self._owns_ppm:
            self._ppm.close()
            self._owns_ppm = False

    # -- the API ------------------------------------------------------------------------------------------

    def solve(self, problems, method: str | MethodSpec | None = None) -> list[Solution]:
        """Solve `problems` (a list of strings, or a Dataset with a `problem` column; gold answers, if any, are not
        used) by `method` (default: `args.method`). Returns one `Solution` per problem, in input order."""
        if method is None:
            method = getattr(self.args, "method", None)
            if method is None:
                raise ValueError("no method: pass method= (e.g. 'mcts@8x4x8:best') or use a SolverConfig")
        (result,) = self.iter_solve(problems, [method])
        return result.solutions

    def solve_methods(self, problems, methods: Sequence[str | MethodSpec]) -> dict[str, MethodResult]:
        """Solve `problems` by every method of `methods`, sharing samples and searches between them (see the module
        docstring); returns {label: MethodResult}, in the order given."""
        return {result.method: result for result in self.iter_solve(problems, methods)}

    def iter_solve(self, problems, methods: Sequence[str | MethodSpec],
                   samples: Sequence[Sequence[Trajectory]] | None = None,
                   samples_time: float = 0.0) -> Iterator[MethodResult]:  # fmt: skip
        """`solve_methods`, one `MethodResult` at a time, as each method finishes.

        `samples`: samples drawn earlier (`draw_samples`, at least as many per problem as the largest maj / best_of_n
        / weighted_maj budget) for those methods to use instead of drawing them, e.g. to compare PPMs on the same
        samples; `samples_time`, the seconds they took, is charged as if they had been drawn here."""
        if self._ppm is None:  # the PPM comes from args: the methods that need one must have it
            specs = self.args.parse_methods(methods)
        else:
            specs = parse_methods(methods, self.args.num_rollouts, self.args.num_candidates)
        questions = self._questions(problems)
        shared = _Shared(specs)
        if samples is not None and shared.num_samples:
            if len(samples) != len(questions):
                raise ValueError(f"samples has {len(samples)} rows, one per problem was expected ({len(questions)})")
            short = next((i for i, row in enumerate(samples) if len(row) < shared.num_samples), None)
            if short is not None:
                raise ValueError(
                    f"samples has {len(samples[short])} samples of problem {short}; the methods need "
                    f"{shared.num_samples}: draw at least that many"
                )
            # Copies: scoring writes each sample's score, and the caller may score the same samples with another PPM.
            shared.samples = [[replace(t, step_scores=None, score=None) for t in row] for row in samples]
            shared.samples_time = samples_time
        return self._iter_solve(questions, specs, shared)

    def _iter_solve(self, questions: list[str], specs: list[MethodSpec], shared: _Shared) -> Iterator[MethodResult]:
        executor = self._executor()
        try:
            for spec in specs:
                t0, shared_before = time.perf_counter(), shared.time
                solutions, charged = self._solve(spec, questions, executor, shared)
                # Shared work done during this call is replaced by the share charged to this method.
                elapsed = time.perf_counter() - t0 - (shared.time - shared_before) + charged
                yield MethodResult(spec, solutions, elapsed)
        finally:
            executor.close()

    @staticmethod
    def _questions(problems) -> list[str]:
        if isinstance(problems, str):
            raise TypeError("problems must be a list of problem strings or a Dataset with a 'problem' column, got one "
                            "string: pass [problem]")  # fmt: skip
        if isinstance(problems, Dataset):
            if "problem" not in problems.column_names:
                raise ValueError(
                    f"the problems Dataset has no 'problem' column (it has {problems.column_names}): rename the "
                    "question column (dataset.rename_column) or load it with rstar_trl.load_problems"
                )
            questions = problems["problem"]
        else:
            try:
                questions = list(problems)
            except TypeError:
                raise TypeError(
                    "problems must be a list of problem strings or a Dataset with a 'problem' column, got "
                    f"{type(problems).__name__}"
                ) from None
        bad = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
        if bad:
            raise ValueError(f"problem(s) at position(s) {bad[:10]} are not non-empty strings")
        if not questions:
            raise ValueError("there are no problems to solve")
        return [str(q) for q in questions]

    # -- methods ------------------------------------------------------------------------------------------

    def _solve(self, spec: MethodSpec, questions: list[str], executor: PythonExecutor,
               shared: _Shared) -> tuple[list[Solution], float]:  # fmt: skip
        """The solutions of one method, and the time of shared work charged to it."""
        if spec.name == "greedy":
            prompts = [format_prompt(q, self.args.template) for q in questions]
            mine = self._my_problems(len(prompts))
            rows = sample_solutions(
                self.backend, executor, self.args, prompts, 1, 0.0, desc=self._desc("greedy"), problems=mine
            )
            rows = self._gather(mine, rows)
            return [
                Solution(i, questions[i], spec.label, t.answer, t.text, None, 0, None, t.tokens,
                         [_sample_candidate(t)], {"end": t.end})
                for i, (t,) in enumerate(rows)
            ], 0.0  # fmt: skip
        if spec.name in SAMPLE_METHODS:
            return self._solve_samples(spec, questions, executor, shared)
        if spec.name == "mcts":
            return self._solve_mcts(spec, questions, shared)
        mine = self._my_problems(len(questions))
        results = beam_search(
            self.backend,
            executor,
            self.ppm,
            self.args,
            questions,
            *spec.budget,
            desc=self._desc(spec.label),
            problems=mine,
        )
        results = self._gather(mine, results)
        solutions = []
        for i, r in enumerate(results):
            candidates = [Candidate(t.text, t.answer, t.score, end=t.end) for t in r.finished]
            chosen = next((k for k, t in enumerate(r.finished) if t is r.best), None)
            solutions.append(Solution(
                i, questions[i], spec.label, r.best.answer if r.best else None, r.best.text if r.best else None,
                r.best.score if r.best else None, chosen, None, r.tokens, candidates,
                {"finished_beams": len(r.finished)},
            ))  # fmt: skip
        return solutions, 0.0

    def draw_samples(self, problems, num_samples: int,
                     executor: PythonExecutor | None = None) -> list[list[Trajectory]]:  # fmt: skip
        """`num_samples` step-wise solutions of every problem at `args.temperature` (result[i][j]: sample j of
        problem i), unscored: the samples `maj@K`, `best_of_n@N` and `weighted_maj@N` (K, N <= num_samples) choose
        from. Pass them to `iter_solve(..., samples=...)` to evaluate several PPMs on the same samples; they are
        seeded per (seed, problem, sample, step, attempt), so a run draws the same ones."""
        questions = self._questions(problems)
        prompts = [format_prompt(q, self.args.template) for q in questions]
        mine = self._my_problems(len(prompts))
        own_executor = executor is None
        if own_executor:
            executor = self._executor()
        try:
            return self._gather(mine, sample_solutions(
                self.backend, executor, self.args, prompts, num_samples, self.args.temperature,
                desc=self._desc(f"sampling {num_samples}"), problems=mine,
            ))  # fmt: skip
        finally:
            if own_executor:
                executor.close()

    def _shared_samples(self, questions: list[str], executor: PythonExecutor, shared: _Shared):
        if shared.samples is None:
            t0 = time.perf_counter()
            shared.samples = self.draw_samples(questions, shared.num_samples, executor)
            shared.samples_time = time.perf_counter() - t0
            shared.time += shared.samples_time
        return shared.samples

    def _score_samples(self, questions: list[str], shared: _Shared) -> None:
        """ONE PPM call for the answered samples: every prefix of every sample when a step aggregation is asked for
        (the last prefix is the whole solution), else the whole solutions only. Under `accelerate launch` each
        process scores its problems' samples."""
        if shared.scores_time is not None:
            return
        t0 = time.perf_counter()
        mine = self._my_problems(len(shared.samples))
        answered = [t for i in mine for t in shared.samples[i][: shared.num_samples] if t.answer is not None]
        if answered and shared.step_scores_needed:
            texts = [(t, prefix) for t in answered for prefix in t.prefixes]
            scores = self.ppm.score([questions[t.problem] for t, _ in texts], [prefix for _, prefix in texts])
            for t in answered:
                t.step_scores = []
            for (t, _), score in zip(texts, scores):
                t.step_scores.append(float(score))
            for t in answered:
                t.score = t.step_scores[-1]
        elif answered:
            scores = self.ppm.score([questions[t.problem] for t in answered], [t.text for t in answered])
            for t, score in zip(answered, scores):
                t.score = float(score)
        if self.state.num_processes > 1:
            scored = self._gather(mine, [[(t.score, t.step_scores) for t in shared.samples[i]] for i in mine])
            for row, row_scores in zip(shared.samples, scored):
                for t, (score, step_scores) in zip(row, row_scores):
                    t.score, t.step_scores = score, step_scores
        shared.scores_time = time.perf_counter() - t0
        shared.time += shared.scores_time

    # -- processes ----------------------------------------------------------------------------------------

    def _executor(self) -> PythonExecutor:
        args = self.args
        return PythonExecutor(timeout=args.executor_timeout, memory_mb=args.executor_memory_mb,
                              max_workers=args.executor_workers)  # fmt: skip

    def _desc(self, label: str) -> str:
        """A progress bar's label; under `accelerate launch`, with the process."""
        return f"{label} [rank {self.state.process_index}]" if self.state.num_processes > 1 else label

    def _my_problems(self, num_problems: int) -> list[int]:
        """The problems this process solves: every one, or every N-th of N processes."""
        return list(range(self.state.process_index, num_problems, self.state.num_processes))

    def _gather(self, mine: list[int], results: list) -> list:
        """Every process's `results` (results[k] belongs to problem mine[k]), in problem order."""
        if self.state.num_processes == 1:
            return results
        from accelerate.utils import gather_object

        pairs = gather_object(list(zip(mine, results)))
        return [result for _, result in sorted(pairs, key=lambda pair: pair[0])]

    def _solve_samples(self, spec: MethodSpec, questions: list[str], executor: PythonExecutor,
                       shared: _Shared) -> tuple[list[Solution], float]:  # fmt: skip
        samples = self._shared_samples(questions, executor, shared)
        shared_time = shared.samples_time
        if spec.needs_ppm:
            self._score_samples(questions, shared)
            shared_time += shared.scores_time
        budget = spec.num_samples
        solutions = []
        used_tokens = sampled_tokens = 0
        for i, row in enumerate(samples):
            used = row[:budget]
            if spec.name == "maj":
                candidates = [_sample_candidate(t) for t in used]
                chosen, votes = select_answer(candidates, "majority")
            elif spec.name == "weighted_maj":
                candidates = [_sample_candidate(t, t.score) for t in used]
                chosen, votes = select_answer(candidates, "vote")
            else:
                candidates = [_sample_candidate(t, _trajectory_score(t, spec.aggregation)) for t in used]
                chosen, votes = select_answer(candidates, "best")
            tokens = sum(t.tokens for t in used)
            used_tokens += tokens
            sampled_tokens += sum(t.tokens for t in row)
            pick = candidates[chosen] if chosen is not None else None
            solutions.append(Solution(
                i, questions[i], spec.label, pick.answer if pick else None, pick.text if pick else None,
                pick.score if pick else None, chosen, votes, tokens, candidates,
            ))  # fmt: skip
        # Shared work is charged in proportion to the tokens a method uses of it.
        return solutions, shared_time * (used_tokens / sampled_tokens if sampled_tokens else 0.0)

    def _searches(self, spec: MethodSpec, questions: list[str], shared: _Shared):
        """The T searches of every problem for (T, R, C): one MCTSGenerator run over the problems each repeated T
        times (row i*T + t is search t of problem i; its seeds derive from the row). Tokens are metered per problem
        (a problem's T searches share its prompt), so the sum over a problem's searches is what it is charged."""
        key = spec.search_budget
        if key not in shared.searches:
            num_searches, rollouts, candidates = key
            config = self.args.mcts_config(rollouts, candidates)
            meter = _TokenMeter(self.backend, [format_prompt(q, config.template) for q in questions])
            # Test-time mode: no answer column, so terminal nodes are valued by the PPM and backed up (Eq. 2, 3).
            rows = Dataset.from_dict({"problem": [q for q in questions for _ in range(num_searches)]})
            t0 = time.perf_counter()
            with MCTSGenerator(meter, config, rows, ppm=self.ppm) as generator:
                trees = generator.generate()
            elapsed = time.perf_counter() - t0
            results = [_search_candidate(row) for row in trees]
            grouped = [results[i * num_searches : (i + 1) * num_searches] for i in range(len(questions))]
            tokens = meter.tokens
            if self.state.num_processes > 1:  # each process metered the searches it ran
                from accelerate.utils import gather_object

                counts = gather_object([tokens])
                tokens = [sum(column) for column in zip(*counts)]
            shared.searches[key] = (grouped, tokens, elapsed)
            shared.time += elapsed
        return shared.searches[key]

    def _solve_mcts(self, spec: MethodSpec, questions: list[str], shared: _Shared) -> tuple[list[Solution], float]:
        grouped, tokens, elapsed = self._searches(spec, questions, shared)
        solutions = []
        for i, candidates in enumerate(grouped):
            chosen, votes = select_answer(candidates, spec.selection)
            pick = candidates[chosen] if chosen is not None else None
            statuses = [c.end for c in candidates]
            info = {"status": "searched" if "searched" in statuses else statuses[0]}
            solutions.append(Solution(
                i, questions[i], spec.label, pick.answer if pick else None, pick.text if pick else None,
                pick.score if pick else None, chosen, votes, tokens[i], candidates, info,
            ))  # fmt: skip
        return solutions, elapsed  # every selection with this TxRxC is charged the whole search


def _sample_candidate(t: Trajectory, score: float | None = None) -> Candidate:
    return Candidate(t.text, t.answer, score, t.step_scores, t.tokens, t.end)


def _trajectory_score(t: Trajectory, aggregation: str) -> float | None:
    if t.score is None:
        return None
    if aggregation == "last":
        return t.score
    return aggregate_step_scores(t.step_scores, aggregation)


def _search_candidate(row: dict) -> Candidate:
    """A search's result: its best terminal (the highest PPM reward; `SearchTree.best_terminal`) with that reward
    as its score and the PPM values along its path as step scores."""
    if row["best_trajectory"] is None:
        return Candidate(None, None, end=row["status"])
    tree = SearchTree.from_json(row["tree"])
    best = tree.best_terminal()
    path = best.path()
    step_scores = [n.ppm_score for n in path]
    return Candidate(
        row["best_trajectory"], row["best_answer"], best.reward,
        step_scores if all(s is not None for s in step_scores) else None, None, row["status"],
    )  # fmt: skip
