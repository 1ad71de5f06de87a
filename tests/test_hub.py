"""Hub folders and the push path when the Hub cannot be reached (nothing here can reach it)."""

import os

import pytest
from datasets import Dataset, load_dataset

from rstar_trl.hub import HubPushError, push_folder, render_card, save_dataset_folder


def test_a_dataset_folder_loads_back_and_carries_its_card(tmp_path):
    data = Dataset.from_dict({"problem": ["1+1", "2+2"], "solved": [True, False]})
    card = render_card("trees_dataset_card.md", repo_id="org/run-trees", num_problems=2, num_solved=1)
    folder = save_dataset_folder(data, str(tmp_path / "trees"), card)
    assert load_dataset(folder, split="train").to_dict() == data.to_dict()
    text = open(os.path.join(folder, "README.md")).read()
    assert "# org/run-trees" in text and "| problems | 2 |" in text and "2501.04519" in text


def test_a_failed_push_keeps_everything_and_prints_the_upload_command(tmp_path, monkeypatch):
    # The Hub is out of reach from here: point the client at a closed local port so the failure is a real one.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = save_dataset_folder(Dataset.from_dict({"x": [1]}), str(tmp_path / "f"), "card")
    before = sorted(os.listdir(folder))
    with pytest.raises(HubPushError) as err:
        push_folder(folder, "org/run-trees", token="hf_fake_token_for_the_test")
    assert f"hf upload org/run-trees {folder} . --repo-type dataset" in str(err.value)
    assert "org/run-trees failed" in str(err.value) and "Nothing is lost" in str(err.value)
    assert sorted(os.listdir(folder)) == before
