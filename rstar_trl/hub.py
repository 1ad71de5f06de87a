"""Hugging Face Hub uploads of the artifacts a run writes (datasets and checkpoints), with cards.

Everything is written locally first, as a folder ready for the Hub (parquet data + README.md card); pushing is a
separate step with real `huggingface_hub` calls (`create_repo`, `upload_folder`). If it fails (no network, no
token, no permission), nothing is lost: the error says why and gives the `hf upload` command that pushes the same
folder later.
"""

from __future__ import annotations

import os
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
    """Create `repo_id` if needed and upload `folder` to it; returns the repo URL. Raises `HubPushError`."""
    from huggingface_hub import HfApi

    command = f"hf upload {repo_id} {folder} . --repo-type {repo_type}"
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type, commit_message=commit_message)
    except Exception as exc:  # network, auth, permissions: all reported the same way, with the manual command
        message = f"Pushing {folder} to the Hub repo {repo_id} failed: {type(exc).__name__}: {exc}"
        raise HubPushError(message, command) from exc
    return str(url)


def load_dataset_folder(folder: str) -> Dataset:
    """Read back a dataset folder written by `save_dataset_folder` (its parquet data; the card is not needed)."""
    path = os.path.join(folder, "data", "train-00000-of-00001.parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a dataset folder written by save_dataset_folder (no {path})")
    return Dataset.from_parquet(path)
