"""Generation on remote servers: any OpenAI-compatible `/v1/completions` endpoint, `vllm serve` in particular.

Use it when the policy is served on other machines (one `vllm serve` per GPU node) and the search runs elsewhere.
Requests run concurrently (one per prompt, `n` samples each); transient failures (connection errors, 429, 5xx)
are retried with exponential back-off; a server that cannot be reached fails fast with a clear error.

`ServerClient` is that HTTP layer on its own; `rstar_trl.ppm.ServerPPMScorer` (a PPM served by `vllm serve
--runner pooling`) shares it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from .backends import Completion, GenerationBackend, count_tokens, cut_at_stop, prompt_seeds

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_T = TypeVar("_T")
_R = TypeVar("_R")


class ServerUnreachableError(ConnectionError):
    """The server (generation or PPM) did not answer (after all retries)."""


class ServerRequestError(ValueError):
    """The server answered a request with an error that retrying cannot fix (HTTP 4xx other than 408/429)."""

    def __init__(self, message: str, status_code: int, body: str):
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class ServerClient:
    """JSON requests to a `vllm serve`-like server: a pooled httpx client, retries with exponential back-off and
    jitter on transient failures (connection errors, 408, 429, 5xx), and errors that name the server.

    A mixin: a class that talks to a server calls `_connect` in its `__init__` and then `_request`, `_served_model`
    and `_map`; `close` closes the client. `_server_role` and `_start_hint` word the error of a server that never
    answers.
    """

    _server_role = "server"
    _start_hint = "`vllm serve <model> --host 0.0.0.0 --port 8000`"

    def _connect(self, base_url: str, concurrency: int, max_retries: int, backoff: float, timeout: float,
                 api_key: str | None) -> None:  # fmt: skip
        """Set up the client; `base_url` may end in "/v1"."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )  # fmt: skip

    def _request(self, method: str, path: str, payload: dict | None = None) -> Any:
        """The JSON answer to one request. Transient failures are retried `max_retries` times (then
        `ServerUnreachableError`); any other error status raises `ServerRequestError` at once."""
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
                    raise ServerRequestError(
                        f"the server at {self.base_url} rejected {method} {path} with HTTP {response.status_code}: "
                        f"{response.text[:500]}",
                        response.status_code, response.text,
                    )  # fmt: skip
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if attempt == self.max_retries:
                raise ServerUnreachableError(
                    f"no answer from the {self._server_role} at {self.base_url} ({method} {path}) after "
                    f"{self.max_retries + 1} attempts; last error: {problem}. Is it running? Start one with "
                    f"{self._start_hint}"
                )
            logger.warning("%s %s failed (%s); retrying in %.1f s", method, path, problem, delay)
            time.sleep(delay * (0.5 + random.random()))  # jitter keeps many clients from retrying in step
            delay = min(delay * 2, 60.0)
        raise AssertionError("unreachable")

    def _served_model(self, model: str | None) -> dict:
        """The `/v1/models` entry of `model` (default: the first the server lists); an error names what it serves."""
        listing = self._request("GET", "/v1/models")
        served = listing.get("data") or []
        if not served:
            raise ValueError(f"the server at {self.base_url} serves no model (GET /v1/models returned {listing})")
        names = [m["id"] for m in served]
        if model is not None and model not in names:
            raise ValueError(f"the server at {self.base_url} does not serve {model!r}; it serves {names}")
        return served[names.index(model)] if model else served[0]

    def _map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
        """`fn` on every item, up to `concurrency` requests in flight; results in input order."""
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()


class OpenAIServerBackend(ServerClient, GenerationBackend):
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

    _server_role = "generation server"
    concurrent_calls = True  # every call is HTTP requests through a thread-safe client; the server batches them
    _start_hint = "`vllm serve <model> --host 0.0.0.0 --port 8000` and pass --server_url http://<host>:8000"

    def __init__(self, base_url: str, model: str | None = None, tokenizer=None, concurrency: int = 64,
                 max_retries: int = 5, backoff: float = 1.0, timeout: float = 600.0,
                 api_key: str | None = None):  # fmt: skip
        self._connect(base_url, concurrency, max_retries, backoff, timeout, api_key)
        entry = self._served_model(model)
        self.model = entry["id"]
        self._max_context = entry.get("max_model_len")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer

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

        return self._map(count, texts)

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

        return self._map(one, range(len(prompts)))
