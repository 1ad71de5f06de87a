"""Hub folders and the push boundary: real `huggingface_hub` calls against the local fake Hub in tests/fake_hub.py
(create repo, card check, preupload, git-LFS batch + PUT + verify, NDJSON commit), and the failures a user meets
(not logged in, no write permission, a conflict, no network, offline mode). Nothing here reaches the real Hub."""

import hashlib
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
from datasets import Dataset, load_dataset
from fake_hub import FakeHub, git_blob_sha1, upload_mode
from safetensors.numpy import save_file

from rstar_trl.hub import HubPushError, push_folder, render_card, save_dataset_folder

PARQUET = "data/train-00000-of-00001.parquet"


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as fake:
        fake.patch(monkeypatch)
        yield fake


def _folder(tmp_path, name: str = "trees") -> str:
    """A dataset folder as the round writes it (parquet + card), plus a safetensors file and a small JSON file."""
    data = Dataset.from_dict({"problem": ["1+1", "2+2", "3+3"], "solved": [True, False, True]})
    card = render_card("trees_dataset_card.md", repo_id=f"org/run-{name}", num_problems=3, num_solved=2)
    folder = save_dataset_folder(data, str(tmp_path / name), card)
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"hidden_size": 8}, f)
    return folder


def _snapshot(folder: str) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def _read(folder: str, path: str) -> bytes:
    with open(os.path.join(folder, path), "rb") as f:
        return f.read()


def test_a_dataset_folder_loads_back_and_carries_its_card(tmp_path):
    data = Dataset.from_dict({"problem": ["1+1", "2+2"], "solved": [True, False]})
    card = render_card("trees_dataset_card.md", repo_id="org/run-trees", num_problems=2, num_solved=1)
    folder = save_dataset_folder(data, str(tmp_path / "trees"), card)
    assert load_dataset(folder, split="train").to_dict() == data.to_dict()
    text = open(os.path.join(folder, "README.md")).read()
    assert "# org/run-trees" in text and "| problems | 2 |" in text and "2501.04519" in text


@pytest.mark.parametrize("repo_type", ["dataset", "model"])
def test_parquet_and_safetensors_go_through_lfs_and_the_card_as_a_regular_file(hub, tmp_path, repo_type):
    folder = _folder(tmp_path)
    before = _snapshot(folder)
    url = push_folder(folder, "org/run-trees", repo_type=repo_type, token=hub.token, commit_message="round 1: trees")
    assert url == f"{hub.url}/{'datasets/' if repo_type == 'dataset' else ''}org/run-trees"
    assert hub.created == [{"name": "run-trees", "organization": "org", "type": repo_type}]
    commit = hub.last_commit(repo_type, "org/run-trees")
    assert commit["summary"] == "round 1: trees"
    # The large-file path: announced in the LFS batch, bytes PUT to the upload URL, checked there against the sha256
    # and size announced, then referenced by oid in the commit.
    lfs = {path: hashlib.sha256(before[path]).hexdigest() for path in (PARQUET, "model.safetensors")}
    assert commit["lfs"] == {path: {"oid": oid, "size": len(before[path])} for path, oid in lfs.items()}
    assert sorted(hub.lfs_puts) == sorted(lfs.values())  # each sent once
    for path, oid in lfs.items():
        assert hashlib.sha256(hub.lfs_objects[oid]).hexdigest() == oid and hub.lfs_objects[oid] == before[path]
    # The card and the JSON file: inline (base64) in the commit, byte for byte.
    assert commit["regular"] == {"README.md": before["README.md"], "config.json": before["config.json"]}
    assert hub.cards and "rstar-math" in hub.cards[0]["tags"]  # the card's YAML metadata was checked first
    assert not hub.rejected and not hub.unknown
    assert f"POST /{'datasets/' if repo_type == 'dataset' else ''}org/run-trees.git/info/lfs/objects/batch" in (
        hub.requests
    )
    assert hub.requests.count("POST /lfs-verify") == 2  # the optional verify action is followed
    assert _snapshot(folder) == before  # pushing changes nothing locally


def test_the_fake_decides_lfs_like_the_hub_and_the_client_follows_it(hub, tmp_path):
    assert upload_mode(PARQUET, 900, b"PAR1\x15\x04") == "lfs" and upload_mode("model.safetensors", 90, b"{}") == "lfs"
    assert upload_mode("README.md", 900, b"---\ntags:") == "regular"
    assert upload_mode("weights.raw", 900, b"\x00\x01") == "lfs"  # binary content
    assert upload_mode("notes.txt", 10 * 1024 * 1024, b"text") == "lfs"  # 10 MiB and more
    folder = str(tmp_path / "mixed")
    os.makedirs(folder)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("---\nlicense: mit\n---\n# card\n")
    with open(os.path.join(folder, "blob.raw"), "wb") as f:
        f.write(b"\x00" * 100)  # no LFS pattern, but binary
    with open(os.path.join(folder, "empty.bin"), "wb"):
        pass  # matches *.bin, but an empty file cannot go through LFS: the client sends it inline
    push_folder(folder, "org/mixed", repo_type="model", token=hub.token)
    commit = hub.last_commit("model", "org/mixed")
    assert set(commit["lfs"]) == {"blob.raw"} and set(commit["regular"]) == {"README.md", "empty.bin"}


def test_multipart_lfs_uploads_arrive_whole(tmp_path, monkeypatch):
    with FakeHub(multipart_chunk_size=300) as hub:  # the Hub asks for multipart on large objects
        hub.patch(monkeypatch)
        folder = _folder(tmp_path)
        push_folder(folder, "org/run-trees", token=hub.token)
        oid = hashlib.sha256(_read(folder, PARQUET)).hexdigest()
        assert hub.lfs_objects[oid] == _read(folder, PARQUET) and len(_read(folder, PARQUET)) > 3 * 300
        assert any(request.startswith("PUT /lfs-part/") for request in hub.requests) and not hub.rejected
        assert hub.last_commit("dataset", "org/run-trees")["lfs"][PARQUET]["oid"] == oid


def test_pushing_the_same_folder_again_sends_only_what_changed(hub, tmp_path):
    folder = _folder(tmp_path)
    push_folder(folder, "org/run-trees", token=hub.token)
    puts = list(hub.lfs_puts)
    push_folder(folder, "org/run-trees", token=hub.token)  # create answers 409 (exists): fine with exist_ok
    assert len(hub.commits["datasets/org/run-trees"]) == 1 and hub.lfs_puts == puts  # nothing new: no commit
    with open(os.path.join(folder, "README.md"), "a") as f:
        f.write("\nOne more line.\n")
    push_folder(folder, "org/run-trees", token=hub.token)
    commit = hub.last_commit("dataset", "org/run-trees")
    assert commit["lfs"] == {} and list(commit["regular"]) == ["README.md"] and hub.lfs_puts == puts
    tree = hub.files["datasets/org/run-trees"]
    assert tree["README.md"]["oid"] == git_blob_sha1(_read(folder, "README.md")) and tree[PARQUET]["lfs"]


def test_the_fake_refuses_bytes_that_do_not_match_the_announced_sha256(hub):
    """The LFS checks of the fake can fail: wrong bytes for an announced oid, and a commit naming an oid whose bytes
    never arrived, are refused."""
    good, bad = b"PAR1 the real bytes", b"PAR1 other bytes!!"
    oid = hashlib.sha256(good).hexdigest()

    def call(method: str, path: str, body: bytes, content_type: str = "application/json") -> int:
        headers = {"Authorization": f"Bearer {hub.token}", "Content-Type": content_type,
                   "Accept": "application/vnd.git-lfs+json"}  # fmt: skip
        request = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert call("POST", "/api/repos/create", json.dumps({"name": "x", "organization": "org"}).encode()) == 200
    batch = {"operation": "upload", "objects": [{"oid": oid, "size": len(good)}], "hash_algo": "sha256"}
    assert call("POST", "/org/x.git/info/lfs/objects/batch", json.dumps(batch).encode()) == 200
    assert call("PUT", f"/lfs-upload/{oid}", bad) == 400 and oid not in hub.lfs_objects and hub.rejected
    commit = [
        {"key": "header", "value": {"summary": "s"}},
        {"key": "lfsFile", "value": {"path": "a.parquet", "algo": "sha256", "oid": oid, "size": len(good)}},
    ]
    ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in commit)  # fmt: skip
    assert call("POST", "/api/models/org/x/commit/main", ndjson, "application/x-ndjson") == 400
    assert call("PUT", f"/lfs-upload/{oid}", good) == 200
    assert call("POST", "/api/models/org/x/commit/main", ndjson, "application/x-ndjson") == 200


def _failed_push(folder: str, repo_id: str, token: str) -> str:
    before = _snapshot(folder)
    with pytest.raises(HubPushError) as err:
        push_folder(folder, repo_id, token=token)
    assert _snapshot(folder) == before  # nothing local is deleted or changed
    message = str(err.value)
    assert f"hf upload {repo_id} {folder} . --repo-type dataset" in message and "Nothing is lost" in message
    assert err.value.command == f"hf upload {repo_id} {folder} . --repo-type dataset"
    return message


def test_a_bad_token_says_log_in(hub, tmp_path):
    message = _failed_push(_folder(tmp_path), "org/run-trees", token="hf_not_a_valid_token")
    assert "not logged in, or the token is invalid" in message and "401" in message
    assert "`hf auth login`" in message and "HF_TOKEN" in message
    assert not hub.commits and not hub.lfs_puts


def test_no_write_permission_to_the_org_says_so(hub, tmp_path):
    hub.read_only_namespaces.add("someone-else")
    message = _failed_push(_folder(tmp_path), "someone-else/run-trees", token=hub.token)
    assert "no write permission to someone-else/run-trees (403 Forbidden)" in message
    assert "write access to someone-else" in message and not hub.repos


def test_no_write_permission_to_an_existing_repo_says_so(hub, tmp_path):
    """create_repo's 403 is forgiven when the repo exists (exist_ok): the refusal then comes from the upload."""
    hub.read_only_namespaces.add("someone-else")
    hub.add_repo("someone-else/run-trees", "dataset", {"README.md": b"# theirs\n"})
    message = _failed_push(_folder(tmp_path), "someone-else/run-trees", token=hub.token)
    assert "no write permission to someone-else/run-trees (403 Forbidden)" in message
    assert "POST /api/datasets/someone-else/run-trees/preupload/main" in hub.requests and not hub.commits


def test_a_conflicting_commit_says_conflict(hub, tmp_path):
    hub.failures["commit"] = (409, "A concurrent commit to this branch is in progress")
    message = _failed_push(_folder(tmp_path), "org/run-trees", token=hub.token)
    assert "the Hub reported a conflict (409 Conflict)" in message
    assert "Wait for other pushes to finish, then run the command below again" in message
    assert "The Hub said: A concurrent commit to this branch is in progress" in message
    assert len(hub.lfs_puts) == 2 and not hub.commits  # the bytes went up; the commit did not


def test_an_unreachable_hub_says_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: a real connection failure
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    message = _failed_push(_folder(tmp_path), "org/run-trees", token="hf_fake_token_for_the_test")
    assert "could not reach the Hub at http://127.0.0.1:9" in message


def test_offline_mode_says_unset_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = _failed_push(_folder(tmp_path), "org/run-trees", token="hf_fake_token_for_the_test")
    assert "HF_HUB_OFFLINE is set" in message


def test_a_private_push_command_keeps_private_and_quotes_paths(hub, tmp_path):
    hub.failures["create"] = (500, "Internal Error")
    folder = _folder(tmp_path / "with space")
    with pytest.raises(HubPushError) as err:
        push_folder(folder, "org/run-trees", private=True, token=hub.token)
    assert err.value.command == f"hf upload org/run-trees '{folder}' . --repo-type dataset --private"
    assert "server error (500)" in str(err.value)


def test_with_xet_storage_on_a_refusal_is_still_explained(tmp_path, monkeypatch):
    """With hf_xet installed (the default) the client sends large files through Xet storage, which the fake does not
    serve; its write-token request still gets the Hub's answers, and hf_xet's error quotes the status."""
    from huggingface_hub import constants

    with FakeHub() as hub:
        hub.patch(monkeypatch)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
        hub.failures["xet_token"] = (403, "Write access to this repo is not granted to the token")
        message = _failed_push(_folder(tmp_path), "org/run-trees", token=hub.token)
        assert "no write permission to org/run-trees (403 Forbidden)" in message
        assert "GET /api/datasets/org/run-trees/xet-write-token/main" in hub.requests and not hub.commits
