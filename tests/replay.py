"""A scripted generation backend: a test double for the search logic only (real generation is tested with
the transformers backend on a locally built model)."""

from __future__ import annotations

import re
from collections.abc import Callable

from rstar_trl.format import OUTPUT_END, OUTPUT_START
from rstar_trl.search import Completion, GenerationBackend


class ReplayBackend(GenerationBackend):
    """Returns scripted continuations: `script(completion_so_far)` gives the candidate steps for a node, where
    `completion_so_far` is the prefix with the prompt removed. Answer requests (the prefix ends with the
    executor's output block) are answered with `\\boxed{<output>}` unless `answer` is given."""

    def __init__(self, script: Callable[[str], list[str]], prompt_end: str = "<code>\n",
                 answer: Callable[[str], str] | None = None, max_context: int | None = None):  # fmt: skip
        self.script = script
        self.prompt_end = prompt_end
        self.answer = answer
        self._max_context = max_context
        self.calls: list[tuple[int, int]] = []  # (number of prompts, n) of every generate call

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def count_tokens(self, texts):
        return [len(text.split()) for text in texts]

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        self.calls.append((len(prompts), n))
        results = []
        for prompt in prompts:
            so_far = prompt.split(self.prompt_end, 1)[1] if self.prompt_end in prompt else prompt
            if so_far.endswith(OUTPUT_END + "\n"):
                output = re.findall(re.escape(OUTPUT_START) + r"(.*?)" + re.escape(OUTPUT_END), so_far, re.S)[-1]
                text = (
                    self.answer(output)
                    if self.answer
                    else f"<answer>The answer is \\boxed{{{output}}}.<end_of_answer>"
                )
                results.append([Completion(text, len(text.split()), "stop")] * n)
                continue
            options = self.script(so_far)
            picked = [options[i % len(options)] for i in range(n)] if options else []
            results.append([self._complete(text, stop) for text in picked])
        return results

    @staticmethod
    def _complete(text: str, stop) -> Completion:
        ends = [i + len(s) for s in stop if (i := text.find(s)) >= 0]
        if ends:
            return Completion(text[: min(ends)], len(text.split()), "stop")
        return Completion(text, len(text.split()), "length")
