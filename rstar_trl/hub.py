"""Hugging Face Hub uploads of the artifacts a run writes (datasets and checkpoints), with cards.

Everything is written locally first, as a folder ready for the Hub (parquet data + README.md card); pushing is a
separate step with real `huggingface_hub` calls (`create_repo`, `upload_folder`). If it fails (no network, no
token, no permission), nothing is lost: the error says why and gives the `hf upload` command that pushes the same
folder later.
"""

from __future__ import annotations

import os
import re
import shlex
import string

from datasets import Dataset

# The card templates live in the repository's hub/ folder; rstar_trl/templates is a link to it, which a wheel
# build turns into a copy inside the package (package-data), so installed copies find them too.
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local folder is intact and `command` uploads it by hand."""

    def __init__(self, message: str, command: str):
        super().__init__(f"{message}\nNothing is lost. Upload it later with:\n  {command}")
        self.command = command


def render_card(template: str, **fields) -> str:
    """Fill a card template from `hub/` (`$name` placeholders, see `string.Template`); unknown names stay as is."""
    path = template if os.path.isabs(template) else os.path.join(TEMPLATE_DIR, template)
    with open(path) as f:
        return string.Template(f.read()).safe_substitute({k: str(v) for k, v in fields.items()})


def save_dataset_folder(dataset: Dataset, folder: str, card: str) -> str:
    """Write `dataset` as a Hub dataset folder: `data/train-00000-of-00001.parquet` and the `README.md` card."""
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    dataset.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)
    return folder


def push_folder(folder: str, repo_id: str, repo_type: str = "dataset", private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload with rstar_trl") -> str:  # fmt: skip
    """Create `repo_id` if needed and upload `folder` to it; returns the repo URL. Raises `HubPushError`, whose
    message says in plain words what went wrong (not logged in, no write permission, a conflict, no network, ...)
    and gives the `hf upload` command that pushes the same folder later. Nothing local is touched either way."""
    from huggingface_hub import HfApi

    command = " ".join(["hf", "upload", shlex.quote(repo_id), shlex.quote(folder), ".", "--repo-type", repo_type])
    command += " --private" if private else ""
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type, commit_message=commit_message)
    except Exception as exc:  # network, auth, permissions, conflicts: each explained, always with the manual command
        what = f"Pushing {folder} to the Hub {repo_type} repo {repo_id} failed: {_explain(exc, repo_id, api.endpoint)}"
        detail = " ".join([line.strip() for line in str(exc).splitlines() if line.strip()][:2])[:400]
        raise HubPushError(f"{what}\n(huggingface_hub said: {type(exc).__name__}: {detail})", command) from exc
    return str(url)


def _chain(exc: BaseException):
    """`exc` and the exceptions it was raised from (`__cause__`, else `__context__`), outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _explain(exc: BaseException, repo_id: str, endpoint: str) -> str:
    """Plain words for why a push failed, from the HTTP status the Hub answered (`HfHubHTTPError`, also when it is
    wrapped, e.g. by an LFS upload thread; or a status quoted by the Xet storage client's network error) or from the
    kind of connection failure."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for error in _chain(exc):
        if isinstance(error, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set, so nothing is sent to the Hub. Unset it (or set HF_HUB_OFFLINE=0) to push."
        if isinstance(error, HfHubHTTPError):
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status is not None:
                said = (error.server_message or "").strip()
                return _status_words(status, repo_id, f" The Hub said: {said}" if said else "")
    for error in _chain(exc):  # hf_xet reports HTTP errors as ConnectionError("... (403 Forbidden) ...")
        quoted = re.search(r"\((\d{3}) [A-Z][A-Za-z ]*\)", str(error))
        if quoted and 400 <= int(quoted.group(1)) < 600:
            return _status_words(int(quoted.group(1)), repo_id, "")
    for error in _chain(exc):
        name = type(error).__name__
        if isinstance(error, (ConnectionError, TimeoutError)) or "Connect" in name or name.endswith("Timeout"):
            return f"could not reach the Hub at {endpoint} (no network, or HF_ENDPOINT points to the wrong place)."
    return f"{type(exc).__name__}: {exc}"


def _status_words(status: int, repo_id: str, said: str) -> str:
    namespace = repo_id.split("/")[0] if "/" in repo_id else "your user namespace"
    if status == 401:
        return ("you are not logged in, or the token is invalid or expired (401 Unauthorized). Log in with "
                "`hf auth login`, or set HF_TOKEN to a token with write access "
                f"(https://huggingface.co/settings/tokens).{said}")  # fmt: skip
    if status == 403:
        return (f"your token has no write permission to {repo_id} (403 Forbidden): the repository or the "
                f"namespace {namespace} is not writable with it. Use a token with write access to {namespace} "
                "(a fine-grained token needs it granted explicitly), ask an admin of the organization for write "
                f"rights, or push to a namespace you own.{said}")  # fmt: skip
    if status in (409, 412):
        return (f"the Hub reported a conflict ({status} {'Conflict' if status == 409 else 'Precondition Failed'}): "
                f"another commit or operation on {repo_id} happened at the same time, or the repository exists in "
                "a state that does not allow this commit. Wait for other pushes to finish, then run the command "
                f"below again.{said}")  # fmt: skip
    if status == 404:
        return (f"the Hub cannot find {repo_id} (404 Not Found): it does not exist or your token cannot see it. "
                f"Check the repository id and type and that you are logged in (`hf auth login`).{said}")  # fmt: skip
    if status == 429:
        return f"the Hub is rate-limiting these requests (429 Too Many Requests); try again later.{said}"
    if status >= 500:
        return f"the Hub had a server error ({status}); try again later.{said}"
    return f"the Hub answered HTTP {status}.{said}"


def put_card_section(card: str, marker: str, section: str) -> bool:
    """Put a markdown `section` into the model card at path `card` (a checkpoint's `README.md`), between the comments
    `<!-- {marker} -->` and `<!-- end {marker} -->`: a section with the same marker is replaced, the rest of the card
    is kept, and a new marker is appended at the end. Returns False (writing nothing) when the card does not exist.
    Evaluation results and PPM quality reports go into cards this way, one section per dataset."""
    if not os.path.isfile(card):
        return False
    start, end = f"<!-- {marker} -->", f"<!-- end {marker} -->"
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    with open(card) as f:
        text = f.read()
    if start in text and end in text[text.index(start) :]:
        before, rest = text[: text.index(start)], text[text.index(start) :]
        text = before + block + rest[rest.index(end) + len(end) :].removeprefix("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(card, "w") as f:
        f.write(text)
    return True


def load_dataset_folder(folder: str) -> Dataset:
    """Read back a dataset folder written by `save_dataset_folder` (its parquet data; the card is not needed)."""
    path = os.path.join(folder, "data", "train-00000-of-00001.parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a dataset folder written by save_dataset_folder (no {path})")
    return Dataset.from_parquet(path)
