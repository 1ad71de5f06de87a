"""Generation on remote servers: any OpenAI-compatible `/v1/completions` endpoint, `vllm serve` in particular.

Use it when the policy is served on other machines (one `vllm serve` per GPU node) and the search runs elsewhere.
Requests run concurrently (one per prompt, `n` samples each); transient failures (connection errors, 429, 5xx)
are retried with exponential back-off; a server that cannot be reached fails fast with a clear error.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from .backends import Completion, GenerationBackend, count_tokens, cut_at_stop, prompt_seeds

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class ServerUnreachableError(ConnectionError):
    """The generation server did not answer (after all retries)."""


class OpenAIServerBackend(GenerationBackend):
    """Sampling through an OpenAI-compatible completions server.

    vLLM's extra request fields are sent so a completion keeps its stop marker (`include_stop_str_in_output`) and
    special tokens (`skip_special_tokens=False`), and per-prompt `seed`s make samples reproducible. A server that
    ignores them still works, but completions then lose their final marker and are rejected by the search.

    Args:
        base_url: the server, e.g. "http://10.0.0.5:8000" (with or without the trailing "/v1").
        model: the served model name (default: the first one the server lists).
        tokenizer: a tokenizer (object or path) to count prompt tokens; default: the server's `/tokenize`.
        concurrency: requests in flight at once.
        max_retries: attempts after the first for a request that fails transiently.
        backoff: first back-off in seconds (doubled on each retry, with jitter, capped at 60 s).
        timeout: seconds one request may take.
        api_key: sent as a bearer token when the server needs one.
    """

    def __init__(self, base_url: str, model: str | None = None, tokenizer=None, concurrency: int = 64,
                 max_retries: int = 5, backoff: float = 1.0, timeout: float = 600.0,
                 api_key: str | None = None):  # fmt: skip
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )  # fmt: skip
        listing = self._request("GET", "/v1/models")
        served = listing.get("data") or []
        if not served:
            raise ValueError(f"the server at {self.base_url} serves no model (GET /v1/models returned {listing})")
        names = [m["id"] for m in served]
        if model is not None and model not in names:
            raise ValueError(f"the server at {self.base_url} does not serve {model!r}; it serves {names}")
        entry = served[names.index(model)] if model else served[0]
        self.model = entry["id"]
        self._max_context = entry.get("max_model_len")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.request(method, path, json=payload)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in _RETRY_STATUS:
                    raise ValueError(
                        f"the server at {self.base_url} rejected {method} {path} with HTTP {response.status_code}: "
                        f"{response.text[:500]}"
                    )
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if attempt == self.max_retries:
                raise ServerUnreachableError(
                    f"no answer from the generation server at {self.base_url} ({method} {path}) after "
                    f"{self.max_retries + 1} attempts; last error: {problem}. Is it running? Start one with "
                    "`vllm serve <model> --host 0.0.0.0 --port 8000` and pass --server_url http://<host>:8000"
                )
            logger.warning("%s %s failed (%s); retrying in %.1f s", method, path, problem, delay)
            time.sleep(delay * (0.5 + random.random()))  # jitter keeps many clients from retrying in step
            delay = min(delay * 2, 60.0)
        raise AssertionError("unreachable")

    # -- GenerationBackend --------------------------------------------------------------------------------

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if self.tokenizer is not None:
            return count_tokens(self.tokenizer, texts)

        def count(text: str) -> int:  # vLLM's /tokenize endpoint
            payload = {"model": self.model, "prompt": text, "add_special_tokens": False}
            return self._request("POST", "/tokenize", payload)["count"]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(count, texts))

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        prompts = list(prompts)
        seeds = prompt_seeds(seed, len(prompts))
        fits = [True] * len(prompts)
        if self._max_context:
            fits = [length + max_new_tokens <= self._max_context for length in self.count_tokens(prompts)]

        def one(i: int) -> list[Completion]:
            if not fits[i]:
                return [Completion("", 0, "prompt_too_long")] * n
            payload = {
                "model": self.model, "prompt": prompts[i], "n": n, "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0, "seed": seeds[i] & 0x7FFFFFFF,
                "stop": list(stop), "include_stop_str_in_output": True, "skip_special_tokens": False,
                "spaces_between_special_tokens": False, "return_token_ids": True,
            }  # fmt: skip
            choices = sorted(self._request("POST", "/v1/completions", payload)["choices"], key=lambda c: c["index"])
            row = []
            for choice in choices:
                text, stopped = cut_at_stop(choice["text"], stop)
                if choice.get("token_ids") is not None:
                    tokens = len(choice["token_ids"])
                else:
                    tokens = self.count_tokens([choice["text"]])[0]
                if stopped:
                    reason = "stop"
                elif choice.get("finish_reason") == "stop":
                    reason = "eos"
                else:
                    reason = "length"
                row.append(Completion(text, tokens, reason))
            return row

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, range(len(prompts))))

    def close(self) -> None:
        self.client.close()
