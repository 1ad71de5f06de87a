"""A local fake of the Hugging Face Hub's HTTP API, for tests that push with the real `huggingface_hub` client.

It answers, on 127.0.0.1, the requests `HfApi.create_repo` and `HfApi.upload_folder` send (huggingface_hub 1.x/2.x,
read from `hf_api.py`, `_commit_api.py`, `lfs.py` and `utils/_http.py`), the way the Hub does at this boundary:

- `POST /api/repos/create` (create_repo): 200 with the repo URL; 409 when it exists (the client swallows it with
  `exist_ok=True`); 403 in a namespace the token cannot write to.
- `GET /api/{type}s/{repo_id}[/revision/{rev}]` (repo_info; the client asks after a 401/403 on create and for the
  head commit after an empty commit).
- `POST /api/validate-yaml`: the card's YAML metadata check before each commit with a README.md.
- `POST /api/{type}s/{repo_id}/preupload/{rev}`: for each file "regular" or "lfs" (see `upload_mode`), with the oid of
  the file already there, if any (the client skips unchanged files).
- `POST /{prefix}{repo_id}.git/info/lfs/objects/batch` (git-lfs batch API): for each announced object (oid = sha256,
  size), an upload action (a PUT URL on this server; a multipart one when `multipart_chunk_size` is set) and a verify
  action; no actions for an object already stored.
- `PUT /lfs-upload/{oid}`, `PUT /lfs-part/{oid}/{n}` + `POST /lfs-complete/{oid}`, `POST /lfs-verify`: receive
  the bytes (plain or chunked transfer encoding) and check that their sha256 and size are what the batch request
  announced; a mismatch is a 400 and is recorded in `rejected`.
- `POST /api/{type}s/{repo_id}/commit/{rev}`: the NDJSON commit (a `header` line, then `file` lines with base64
  content and `lfsFile` lines with an oid); an lfsFile whose bytes never arrived, or a regular file over 10 MiB, is
  refused (400) as the Hub refuses them.

Authentication: every API and LFS-batch request must carry `Authorization: Bearer <token>`; a missing or other token
gets 401 with the Hub's "Invalid credentials in Authorization header". Pre-signed upload URLs (the PUTs) need none,
as on the Hub. `failures` forces an answer for one endpoint (e.g. `{"commit": (409, "...")}`).

Not faked: the Xet storage protocol (CAS) that `huggingface_hub` uses for large files whenever `hf_xet` is installed.
`patch()` and `env()` therefore set HF_HUB_DISABLE_XET=1, which makes the client take the git-LFS path above (the
path it takes without `hf_xet`); everything else (create, preupload, commit) is the same either way. With Xet left
on, the client's first Xet request, `GET /api/{type}s/{repo_id}/xet-write-token/{rev}`, gets the Hub's auth and
permission answers (401, 403, 404), else 501 "not faked" (`failures["xet_token"]` forces one).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

TOKEN = "hf_fake_token"

# The .gitattributes a new Hub repository starts with marks these as LFS (a subset of the Hub's default list, with the
# formats rstar_trl writes: *.safetensors, *.parquet, *.bin, *.pt).
DEFAULT_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz *.onnx "
    "*.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz "
    "*.wasm *.xz *.zip *.zst *tfevents* *.lz4 *.mds *.mp3 *.wav *.jpg *.jpeg *.png *.webp"
).split()
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files of 10 MiB or more
MISSING_METADATA = "Empty or missing yaml metadata in repo card (https://huggingface.co/docs/hub/model-cards)"


def git_blob_sha1(data: bytes) -> str:
    """The git oid of a regular file (what the Hub reports, and `huggingface_hub` compares, for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def upload_mode(path: str, size: int, sample: bytes, patterns=DEFAULT_LFS_PATTERNS) -> str:
    """How the fake's preupload classifies a file: "lfs" when the repository's .gitattributes patterns match its
    path, when it is 10 MiB or more, or when its first 512 bytes look binary (a NUL byte); else "regular"."""
    name = path.rsplit("/", 1)[-1]
    matched = any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)
    return "lfs" if matched or size >= LFS_SIZE_THRESHOLD or b"\0" in sample else "regular"


class FakeHub:
    """The fake Hub's state and server. Use as a context manager or call `start()` / `stop()`.

    Records: `created` (create_repo payloads), `cards` (YAML metadata of each validated card, None when missing),
    `commits[repo_key]` (a list of {"summary", "description", "parent", "regular": {path: bytes}, "lfs": {path:
    {"oid", "size"}}}), `files[repo_key]` (the current tree: path -> {"oid", "size", "lfs", "data"}), `lfs_objects`
    (oid -> bytes received through the LFS path), `lfs_puts` (oids in the order their bytes arrived), `rejected`
    (why uploads or commits were refused), `requests` ("METHOD path" of every request) and `unknown` (requests it
    does not know, answered 404; the optional `GET /api/agent-harnesses` is answered 404 but is not unknown).
    A repo key is "{type}s/{namespace}/{name}", e.g. "datasets/org/run-trees"."""

    def __init__(self, token: str = TOKEN, verify: bool = True, multipart_chunk_size: int | None = None):
        self.token = token
        self.verify = verify
        self.multipart_chunk_size = multipart_chunk_size
        self.read_only_namespaces: set[str] = set()  # the token can read but not write there (403)
        self.failures: dict[str, tuple[int, str]] = {}  # endpoint name -> (status, message) answered instead
        self.repos: dict[str, dict] = {}
        self.created: list[dict] = []
        self.cards: list[dict | None] = []
        self.commits: dict[str, list[dict]] = {}
        self.files: dict[str, dict[str, dict]] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_puts: list[str] = []
        self.rejected: list[str] = []
        self.requests: list[str] = []
        self.unknown: list[str] = []
        self._announced: dict[str, int] = {}  # oid -> size announced by a batch request
        self._parts: dict[str, dict[int, bytes]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- life cycle ----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake Hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, **extra: str) -> dict[str, str]:
        """Environment variables that point a subprocess's `huggingface_hub` at this fake (merge into os.environ)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": self.token,
                **extra}  # fmt: skip

    def patch(self, monkeypatch) -> None:
        """Point this process's `huggingface_hub` at the fake. Its constants are read when it is imported, so setting
        HF_ENDPOINT now is not enough: patch them too (monkeypatch undoes all of it after the test)."""
        from huggingface_hub import constants

        for name, value in self.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)

    # -- helpers for tests ---------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, repo_type: str = "model", files: dict[str, bytes] | None = None) -> str:
        """A repository that exists before the test (e.g. someone else's, in a read-only namespace)."""
        key = _key(repo_type, repo_id)
        self.repos[key] = {"id": repo_id, "type": repo_type, "private": False, "sha": "0" * 40}
        tree = self.files.setdefault(key, {})
        for path, data in (files or {}).items():
            lfs = upload_mode(path, len(data), data[:512]) == "lfs"
            oid = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            tree[path] = {"oid": oid, "size": len(data), "lfs": lfs, "data": data}
        return key

    def last_commit(self, repo_type: str, repo_id: str) -> dict:
        return self.commits[_key(repo_type, repo_id)][-1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that hangs up (hf_xet giving up) is not news
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


def _key(repo_type: str | None, repo_id: str) -> str:
    return f"{repo_type or 'model'}s/{repo_id}"


def _prefix(repo_type: str) -> str:
    return "" if repo_type == "model" else f"{repo_type}s/"


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries a Content-Length
    fake: FakeHub

    def log_message(self, *args):
        pass

    # -- transport -----------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, body: dict | None = None, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", f"fake-{len(self.fake.requests)}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: _Error) -> None:
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._reply({"error": error.message}, error.status, headers)

    def _handle(self, method: str) -> None:
        body = self._body()
        url = urlsplit(self.path)
        self.fake.requests.append(f"{method} {url.path}")
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            route = self._route(method, parts)
            if route is None:
                self.fake.unknown.append(f"{method} {self.path}")
                raise _Error(404, "Not faked")
            name, handler = route
            if name in self.fake.failures:
                status, message = self.fake.failures[name]
                raise _Error(status, message)
            handler(body)
        except _Error as error:
            self._error(error)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    # -- routing -------------------------------------------------------------------------------------------------

    def _route(self, method: str, p: list[str]):
        api_repo = len(p) >= 4 and p[0] == "api" and p[1] in ("models", "datasets", "spaces")
        if method == "POST" and p == ["api", "repos", "create"]:
            return "create", self._create
        if method == "POST" and p == ["api", "validate-yaml"]:
            return "validate_yaml", self._validate_yaml
        if method == "GET" and p == ["api", "agent-harnesses"]:  # best-effort telemetry registry: the client copes
            return "agent_harnesses", self._not_served  # with a 404 (and would cache an answer under HF_HOME)
        if method == "GET" and api_repo and (len(p) == 4 or (len(p) >= 6 and p[4] == "revision")):
            return "repo_info", lambda body: self._repo_info(p[1][:-1], f"{p[2]}/{p[3]}")
        if method == "POST" and api_repo and len(p) >= 6 and p[4] == "preupload":
            return "preupload", lambda body: self._preupload(p[1][:-1], f"{p[2]}/{p[3]}", body)
        if method == "GET" and api_repo and len(p) >= 6 and p[4] == "xet-write-token":
            return "xet_token", lambda body: self._xet_token(p[1][:-1], f"{p[2]}/{p[3]}")
        if method == "POST" and api_repo and len(p) >= 6 and p[4] == "commit":
            return "commit", lambda body: self._commit(p[1][:-1], f"{p[2]}/{p[3]}", "/".join(p[5:]), body)
        if method == "POST" and p[-4:] == ["info", "lfs", "objects", "batch"] and p[-5].endswith(".git"):
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(p[0], "model")
            names = p[1:-4] if repo_type != "model" else p[:-4]
            if len(names) == 2:
                return "lfs_batch", lambda body: self._lfs_batch(repo_type, f"{names[0]}/{names[1][:-4]}", body)
        if method == "PUT" and len(p) == 2 and p[0] == "lfs-upload":
            return "lfs_put", lambda body: self._lfs_put(p[1], body)
        if method == "PUT" and len(p) == 3 and p[0] == "lfs-part":
            return "lfs_put", lambda body: self._lfs_part(p[1], int(p[2]), body)
        if method == "POST" and len(p) == 2 and p[0] == "lfs-complete":
            return "lfs_complete", lambda body: self._lfs_complete(p[1], body)
        if method == "POST" and len(p) == 1 and p[0] == "lfs-verify":
            return "lfs_verify", self._lfs_verify
        return None

    # -- checks shared by the endpoints --------------------------------------------------------------------------

    def _authenticate(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            raise _Error(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str, write: bool) -> dict:
        self._authenticate()
        key = _key(repo_type, repo_id)
        repo = self.fake.repos.get(key)
        if repo is None:
            raise _Error(404, "Repository not found", code="RepoNotFound")
        if write and repo_id.split("/")[0] in self.fake.read_only_namespaces:
            raise _Error(403, f"You don't have the rights to write to {repo_type} repo {repo_id}")
        return repo

    # -- endpoints -----------------------------------------------------------------------------------------------

    def _create(self, body: bytes) -> None:
        self._authenticate()
        payload = json.loads(body)
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or "fake-user"
        repo_id = f"{namespace}/{payload['name']}"
        self.fake.created.append(payload)
        if namespace in self.fake.read_only_namespaces:
            raise _Error(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        key = _key(repo_type, repo_id)
        url = f"{self.fake.url}/{_prefix(repo_type)}{repo_id}"
        if key in self.fake.repos:
            return self._reply({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.fake.repos[key] = {"id": repo_id, "type": repo_type, "private": private, "sha": "0" * 40}
        self.fake.files.setdefault(key, {})
        self._reply({"url": url, "name": repo_id, "id": repo_id})

    def _not_served(self, body: bytes) -> None:
        raise _Error(404, "Not served by the fake Hub")

    def _repo_info(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id, write=False)
        tree = self.fake.files.get(_key(repo_type, repo_id), {})
        siblings = [{"rfilename": path} for path in sorted(tree)]
        self._reply({"id": repo_id, "sha": repo["sha"], "private": repo["private"], "siblings": siblings})

    def _validate_yaml(self, body: bytes) -> None:
        self._authenticate()
        content = json.loads(body)["content"]
        if not content.startswith("---"):
            self.fake.cards.append(None)
            return self._reply({"errors": [], "warnings": [{"message": MISSING_METADATA}]})
        try:
            metadata = yaml.safe_load(content.split("---")[1])
        except yaml.YAMLError as exc:
            return self._reply({"errors": [{"message": f"Invalid YAML in the card's metadata: {exc}"}]}, 400)
        self.fake.cards.append(metadata)
        if not isinstance(metadata, dict):
            return self._reply({"errors": [{"message": "The card's metadata must be a YAML mapping"}]}, 400)
        self._reply({"errors": [], "warnings": []})

    def _preupload(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._repo(repo_type, repo_id, write=True)
        request = json.loads(body)
        tree = self.fake.files.get(_key(repo_type, repo_id), {})
        ignore = [line.strip() for line in request.get("gitIgnore", "").splitlines() if line.strip()]
        answers = []
        for item in request["files"]:
            sample = base64.b64decode(item["sample"])
            mode = upload_mode(item["path"], int(item["size"]), sample)
            present = tree.get(item["path"])
            ignored = any(fnmatch.fnmatch(item["path"], pattern) for pattern in ignore)
            answer = {"path": item["path"], "uploadMode": mode, "shouldIgnore": ignored}
            answer["oid"] = present["oid"] if present else None
            answers.append(answer)
        self._reply({"files": answers, "commitOid": self.fake.repos[_key(repo_type, repo_id)]["sha"]})

    def _xet_token(self, repo_type: str, repo_id: str) -> None:
        self._repo(repo_type, repo_id, write=True)  # the Hub's checks (401, 404, 403) come first
        raise _Error(501, "Xet storage is not faked: set HF_HUB_DISABLE_XET=1 (FakeHub.patch and FakeHub.env do)")

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._repo(repo_type, repo_id, write=True)
        if self.headers.get("Accept") != "application/vnd.git-lfs+json":
            raise _Error(406, "The LFS batch API answers application/vnd.git-lfs+json only")
        request = json.loads(body)
        if request.get("operation") != "upload" or request.get("hash_algo", "sha256") != "sha256":
            raise _Error(422, "Only sha256 uploads are faked")
        objects = []
        for item in request["objects"]:
            oid, size = item["oid"], int(item["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if self.fake.lfs_objects.get(oid) is not None and len(self.fake.lfs_objects[oid]) == size:
                objects.append(answer)  # already stored: no actions, the client skips the upload
                continue
            with self.fake._lock:
                self.fake._announced[oid] = size
            chunk = self.fake.multipart_chunk_size
            if chunk and "multipart" in request.get("transfers", []) and size > chunk:
                count = -(-size // chunk)
                header = {"chunk_size": str(chunk)}
                header.update({f"{n:05d}": f"{self.fake.url}/lfs-part/{oid}/{n}" for n in range(1, count + 1)})
                upload = {"href": f"{self.fake.url}/lfs-complete/{oid}", "header": header}
            else:
                upload = {"href": f"{self.fake.url}/lfs-upload/{oid}", "header": {}}
            answer["actions"] = {"upload": upload}
            if self.fake.verify:
                answer["actions"]["verify"] = {"href": f"{self.fake.url}/lfs-verify", "header": {}}
            objects.append(answer)
        chosen = "multipart" if self.fake.multipart_chunk_size else "basic"
        self._reply({"transfer": chosen, "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _store(self, oid: str, data: bytes) -> None:
        announced = self.fake._announced.get(oid)
        digest = hashlib.sha256(data).hexdigest()
        if announced is None:
            self.fake.rejected.append(f"{oid}: bytes for an object no batch request announced")
            raise _Error(400, "No upload was announced for this object")
        if digest != oid or len(data) != announced:
            self.fake.rejected.append(f"{oid}: received sha256 {digest}, {len(data)} bytes; announced {announced}")
            raise _Error(400, f"The uploaded bytes do not match the announced object (sha256 {digest})")
        with self.fake._lock:
            self.fake.lfs_objects[oid] = data
            self.fake.lfs_puts.append(oid)

    def _lfs_put(self, oid: str, body: bytes) -> None:
        self._store(oid, body)
        self._reply({})

    def _lfs_part(self, oid: str, number: int, body: bytes) -> None:
        with self.fake._lock:
            self.fake._parts.setdefault(oid, {})[number] = body
        self._reply({}, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_complete(self, oid: str, body: bytes) -> None:
        request = json.loads(body)
        parts = self.fake._parts.pop(oid, {})
        numbers = [part["partNumber"] for part in request.get("parts", [])]
        if request.get("oid") != oid or numbers != sorted(parts) or not all(p.get("etag") for p in request["parts"]):
            self.fake.rejected.append(f"{oid}: bad multipart completion {request}")
            raise _Error(400, "Multipart completion does not match the uploaded parts")
        self._store(oid, b"".join(parts[n] for n in numbers))
        self._reply({})

    def _lfs_verify(self, body: bytes) -> None:
        self._authenticate()
        request = json.loads(body)
        data = self.fake.lfs_objects.get(request["oid"])
        if data is None or len(data) != request["size"]:
            raise _Error(404, f"LFS object {request['oid']} was not uploaded")
        self._reply({})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if not self.headers.get("Content-Type", "").startswith("application/x-ndjson"):
            raise _Error(400, "The commit payload must be application/x-ndjson")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise _Error(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo["sha"]):
            raise _Error(412, "A commit has happened since. Please refresh and try again.")
        commit = {"summary": header.get("summary"), "description": header.get("description"),
                  "parent": header.get("parentCommit"), "revision": revision, "regular": {}, "lfs": {}}  # fmt: skip
        tree = dict(self.fake.files.get(_key(repo_type, repo_id), {}))
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                data = base64.b64decode(value["content"])
                if len(data) >= LFS_SIZE_THRESHOLD:
                    self.fake.rejected.append(f"{value['path']}: regular file of {len(data)} bytes")
                    raise _Error(400, "Your push was rejected because it contains files larger than 10 MiB.")
                commit["regular"][value["path"]] = data
                tree[value["path"]] = {"oid": git_blob_sha1(data), "size": len(data), "lfs": False, "data": data}
            elif line["key"] == "lfsFile":
                oid = value["oid"]
                stored = self.fake.lfs_objects.get(oid)
                if value.get("algo", "sha256") != "sha256" or stored is None:
                    self.fake.rejected.append(f"{value['path']}: commit points to LFS object {oid} never uploaded")
                    raise _Error(400, f"Your push was rejected because an LFS pointer ({oid}) has no uploaded file.")
                if "size" in value and value["size"] != len(stored):
                    raise _Error(400, f"LFS object {oid} has {len(stored)} bytes, the commit says {value['size']}")
                commit["lfs"][value["path"]] = {"oid": oid, "size": len(stored)}
                tree[value["path"]] = {"oid": oid, "size": len(stored), "lfs": True, "data": stored}
            elif line["key"] in ("deletedFile", "deletedFolder"):
                path = value["path"].rstrip("/")
                tree = {p: f for p, f in tree.items() if p != path and not p.startswith(path + "/")}
            else:
                raise _Error(400, f"Commit operation {line['key']!r} is not faked")
        sha = hashlib.sha1(body + repo["sha"].encode()).hexdigest()
        with self.fake._lock:
            repo["sha"] = sha
            self.fake.files[_key(repo_type, repo_id)] = tree
            self.fake.commits.setdefault(_key(repo_type, repo_id), []).append(commit)
        url = f"{self.fake.url}/{_prefix(repo_type)}{repo_id}/commit/{sha}"
        self._reply({"commitUrl": url, "commitOid": sha, "pullRequestUrl": None, "success": True})
