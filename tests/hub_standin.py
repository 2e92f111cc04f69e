"""A loopback stand-in for the Hugging Face Hub HTTP API, for tests only.

It implements the requests that huggingface_hub 2.4 makes to publish a folder
(`create_repo`, `create_branch`, `upload_folder`: validate-yaml, preupload, the LFS batch
API with "basic" single-part uploads, commit) and to download it again (`model_info`,
`list_repo_tree`, `hf_hub_download`'s HEAD/GET on `/resolve/`), keeping repositories and
file contents in a temporary directory.

Bounds: it listens on 127.0.0.1 only, on a free port chosen by the OS; it never redirects
(so no request can loop) and refuses bodies above `MAX_BODY`; idle keep-alive connections
are closed after `IDLE_TIMEOUT` seconds; `stop()` (or leaving the `with` block) shuts it down.

Uploads of LFS files follow the legacy LFS protocol, so huggingface_hub must not use Xet in
the uploading process: set `huggingface_hub.constants.HF_HUB_DISABLE_XET = True` (or the
`HF_HUB_DISABLE_XET=1` environment variable before import).

Failures can be injected with `fail(method, path_pattern, status)`: matching requests are
answered with `status` (and `Retry-After: 0`, so that clients retry at once), or, with
status None, never answered: such a request is held until `stop()` or `HANG_LIMIT` seconds.
`delay(method, path_pattern, seconds)` answers matching requests normally, but only after
`seconds` (a server that takes its time, as the Hub does checking a commit's files).

Deliberately hostile in one respect: a request with an unknown token gets a 401 whose error
message echoes the Authorization header back, as a careless server might, so that tests can
check that clients never show such messages verbatim.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAX_BODY = 256 * 1024 * 1024
IDLE_TIMEOUT = 10.0
HANG_LIMIT = 60.0
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in LFS_SUFFIXES
)


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as the oid/ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def front_matter(text: str) -> dict | None:
    """The YAML metadata block of a README, or None when it has none; raises on invalid YAML."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


@dataclass
class User:
    name: str
    write: bool


@dataclass
class Entry:
    """One file in one commit: its content is in the blob store under `sha256`."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool

    @property
    def oid(self) -> str:
        """What preupload reports as the remote oid (huggingface_hub compares it to its own)."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)  # commit oid -> files
    messages: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class HubStandin:
    """Start with `with HubStandin(tmp_dir, tokens) as hub:`; `hub.endpoint` is its base URL.

    `tokens` maps a token to a `User`; users may create and write repos in their own namespace
    only, and only when `write` is True.
    """

    def __init__(self, root: Path, tokens: dict[str, User]):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.unhandled: list[str] = []  # requests no route matched, for debugging tests
        self._tickets: dict[str, str] = {}  # upload ticket -> oid, for the unauthenticated LFS PUT
        self._lock = threading.RLock()
        self.faults: list[tuple[str, str, int | None]] = []  # (method, path regex, status or None)
        self.delays: list[tuple[str, str, float]] = []  # (method, path regex, seconds)
        self._released = threading.Event()  # lets requests held by a "never answer" fault go
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "HubStandin":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval only makes `stop()` quick; requests are served as they arrive.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "HubStandin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, method: str, path_pattern: str, status: int | None) -> None:
        """Answer `method` requests whose path matches `path_pattern` with `status`, or never (None)."""
        self.faults.append((method, path_pattern, status))

    def delay(self, method: str, path_pattern: str, seconds: float) -> None:
        """Answer `method` requests whose path matches `path_pattern` normally, after `seconds`."""
        self.delays.append((method, path_pattern, seconds))

    # ------------------------------------------------------------------ inspection helpers for tests

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file of `repo_id` at `revision`."""
        with self._lock:
            repo = self.repos[repo_id]
            entries = repo.commits[self._resolve(repo, revision)]
            return {path: self._read_blob(e.sha256) for path, e in entries.items()}

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        with self._lock:
            repo = self.repos[repo_id]
            return {p for p, e in repo.commits[self._resolve(repo, revision)].items() if e.lfs}

    # ------------------------------------------------------------------ storage

    def _store_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.blobs / sha256
        if not path.exists():
            path.write_bytes(content)
        return sha256

    def _read_blob(self, sha256: str) -> bytes:
        return (self.blobs / sha256).read_bytes()

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HttpError(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, Entry], message: str) -> str:
        oid = hashlib.sha1(f"{repo.repo_id}:{branch}:{len(repo.commits)}:{secrets.token_hex(8)}".encode()).hexdigest()
        repo.commits[oid] = files
        repo.messages[oid] = message
        repo.branches[branch] = oid
        return oid

    def _entry(self, content: bytes, lfs: bool) -> Entry:
        return Entry(self._store_blob(content), len(content), git_blob_oid(content), lfs)

    @staticmethod
    def wants_lfs(path: str, size: int) -> bool:
        """The Hub's rule of thumb: binary model formats and anything large go to LFS."""
        return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE

    # ------------------------------------------------------------------ access control

    def user_for(self, authorization: str | None) -> User | None:
        """The user behind the Authorization header; 401 for an unknown token."""
        if not authorization:
            return None
        token = authorization[7:] if authorization.lower().startswith("bearer ") else authorization
        user = self.tokens.get(token.strip())
        if user is None:
            # Echoes the header on purpose, as the only error message: see the module docstring.
            raise HttpError(401, f"Invalid credentials in Authorization header ({authorization})")
        return user

    def repo_for_read(self, repo_id: str, user: User | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or user.name != repo.owner)):
            raise HttpError(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        return repo

    def repo_for_write(self, repo_id: str, user: User | None) -> Repo:
        if user is None:
            raise HttpError(401, "You must be authenticated to write to a repository")
        repo = self.repo_for_read(repo_id, user)
        if user.name != repo.owner or not user.write:
            raise HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ------------------------------------------------------------------ API: repositories

    def create_repo(self, user: User | None, body: dict) -> dict:
        if user is None:
            raise HttpError(401, "You must be authenticated to create a repository")
        if body.get("type") not in (None, "model", "dataset"):
            raise HttpError(400, "this stand-in hosts model and dataset repositories only")
        namespace = body.get("organization") or user.name
        name = body.get("name") or ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HttpError(400, f"invalid repository name {name!r}")
        if namespace != user.name or not user.write:
            raise HttpError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        repo_id = f"{namespace}/{name}"
        if body.get("type") == "dataset":  # datasets live beside models under a "datasets/" key
            repo_id = f"datasets/{repo_id}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            raise HttpError(409, "You already created this model repo", {"X-Url": url})
        repo = Repo(repo_id, user.name, body.get("visibility") == "private" or bool(body.get("private")))
        self.repos[repo_id] = repo
        self._new_commit(repo, "main", {".gitattributes": self._entry(GITATTRIBUTES, False)}, "initial commit")
        return {"url": url, "name": repo_id, "id": repo_id}

    def create_branch(self, repo: Repo, branch: str, body: dict) -> dict:
        if branch in repo.branches:
            raise HttpError(409, "Reference already exists")
        start = self._resolve(repo, body.get("startingPoint") or "main")
        repo.branches[branch] = start
        return {}

    def refs(self, repo: Repo) -> dict:
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()]
        return {"branches": branches, "tags": [], "converts": []}

    def model_info(self, repo: Repo, revision: str, query: dict) -> dict:
        commit = self._resolve(repo, revision)
        entries = repo.commits[commit]
        card = {}
        if "README.md" in entries:
            try:
                card = front_matter(self._read_blob(entries["README.md"].sha256).decode("utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError):
                card = {}
        siblings = []
        for path, entry in sorted(entries.items()):
            sibling = {"rfilename": path}
            if query.get("blobs"):
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": 134}
            siblings.append(sibling)
        tags = list(card.get("tags") or [])
        return {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.owner,
            "sha": commit,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "pipeline_tag": card.get("pipeline_tag"),
            "library_name": card.get("library_name"),
            "cardData": card or None,
            "siblings": siblings,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }

    def tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict]:
        entries = repo.commits[self._resolve(repo, revision)]
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        files, folders = [], set()
        for path, entry in sorted(entries.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:  # every parent folder below `prefix` is listed too
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
            files.append(item)
        if prefix and not files and not folders:
            raise HttpError(404, f"{folder} does not exist", {"X-Error-Code": "EntryNotFound"})
        dirs = [{"type": "directory", "oid": git_blob_oid(d.encode()), "size": 0, "path": d} for d in sorted(folders)]
        return dirs + files

    # ------------------------------------------------------------------ API: uploads

    def preupload(self, repo: Repo, revision: str, body: dict) -> dict:
        current = repo.commits[self._resolve(repo, revision)]
        answers = []
        for item in body.get("files") or []:
            path, size = item["path"], int(item["size"])
            existing = current.get(path)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if self.wants_lfs(path, size) else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing else None,
                }
            )
        return {"files": answers, "commitOid": self._resolve(repo, revision)}

    def lfs_batch(self, repo: Repo, body: dict) -> dict:
        if body.get("operation") != "upload":
            raise HttpError(400, "this stand-in only supports LFS uploads")
        if "basic" not in (body.get("transfers") or ["basic"]):
            raise HttpError(400, "this stand-in only supports the basic LFS transfer")
        objects = []
        for obj in body.get("objects") or []:
            oid, size = obj["oid"], int(obj["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if not (self.blobs / oid).exists():
                ticket = secrets.token_urlsafe(16)
                self._tickets[ticket] = oid
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/__lfs__/{oid}?ticket={ticket}", "expires_in": 3600},
                    "verify": {"href": f"{self.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, ticket: str, content: bytes) -> dict:
        # Like a presigned storage URL: no Authorization header, the ticket is the credential.
        if self._tickets.pop(ticket, None) != oid:
            raise HttpError(403, "invalid or expired upload ticket")
        if hashlib.sha256(content).hexdigest() != oid:
            raise HttpError(400, "content does not match its sha256")
        self._store_blob(content)
        return {}

    def lfs_verify(self, body: dict) -> dict:
        path = self.blobs / str(body.get("oid"))
        if not path.exists() or path.stat().st_size != body.get("size"):
            raise HttpError(404, "object not uploaded")
        return {}

    def commit(self, repo: Repo, revision: str, lines: list[dict], query: dict) -> dict:
        if query.get("create_pr"):
            raise HttpError(400, "pull requests are not supported by this stand-in")
        if revision not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
        header = next((ln["value"] for ln in lines if ln.get("key") == "header"), None)
        if not header or not header.get("summary"):
            raise HttpError(400, "commit summary is required")
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[revision]:
            raise HttpError(412, "parent commit is not the head of the branch")
        files = dict(repo.commits[repo.branches[revision]])
        for line in lines:
            self._apply(files, line)
        oid = self._new_commit(repo, revision, files, header["summary"])
        return {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{oid}",
            "commitMessage": header["summary"],
            "hookOutput": "",
            "pullRequestUrl": None,
        }

    def _apply(self, files: dict[str, Entry], line: dict) -> None:
        key, value = line.get("key"), line.get("value") or {}
        if key == "file":
            if value.get("encoding") != "base64":
                raise HttpError(400, "regular files must be base64-encoded")
            files[value["path"]] = self._entry(base64.b64decode(value["content"]), False)
        elif key == "lfsFile":
            blob = self.blobs / value["oid"]
            if not blob.exists():
                raise HttpError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
            files[value["path"]] = self._entry(blob.read_bytes(), True)
        elif key == "deletedFile":
            if files.pop(value["path"], None) is None:
                raise HttpError(404, "A file with this name doesn't exist", {"X-Error-Code": "EntryNotFound"})
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]
        elif key != "header":
            raise HttpError(400, f"unknown commit operation {key!r}")

    def validate_yaml(self, body: dict) -> dict:
        try:
            front_matter(body.get("content") or "")
        except yaml.YAMLError as error:
            raise HttpError(400, "invalid YAML", {"X-Error-Message": f"invalid YAML: {error}".splitlines()[0]})
        return {"errors": [], "warnings": []}

    # ------------------------------------------------------------------ API: downloads

    def resolve(self, repo: Repo, revision: str, path: str) -> tuple[Entry, str]:
        commit = self._resolve(repo, revision)
        entry = repo.commits[commit].get(path)
        if entry is None:
            raise HttpError(404, "Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        return entry, commit


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to `HubStandin` methods, turning `HttpError` into JSON error responses."""

    hub: HubStandin
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects
    timeout = IDLE_TIMEOUT

    # One table: (method, regex on the raw path) -> handler name. Revisions arrive URL-quoted.
    ROUTES = [
        ("POST", r"/api/repos/create", "_create_repo"),
        ("POST", r"/api/validate-yaml", "_validate_yaml"),
        ("GET", r"/api/whoami-v2", "_whoami"),
        ("GET", r"/api/agent-harnesses", "_agent_harnesses"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "_model_info"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "_tree"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/refs", "_refs"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", "_create_branch"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "_preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "_commit"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "_lfs_batch"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify", "_lfs_verify"),
        ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})", "_lfs_put"),
        ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
        ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
    ]

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        # Dataset repositories take the model routes with "datasets" in the path: /api/datasets/...
        # and /datasets/<repo>/resolve/...; their repository key is "datasets/<repo>".
        path, dataset = url.path, False
        for prefix, replacement in (("/api/datasets/", "/api/models/"), ("/datasets/", "/")):
            if path.startswith(prefix):
                path, dataset = replacement + path[len(prefix):], True
                break
        status = 500
        try:
            body = self._read_body()
            for delay_method, pattern, seconds in self.hub.delays:
                if delay_method == method and re.fullmatch(pattern, url.path):
                    self.hub._released.wait(seconds)
            for fault_method, pattern, fault_status in self.hub.faults:
                if fault_method == method and re.fullmatch(pattern, url.path):
                    if fault_status is None:
                        self.hub._released.wait(HANG_LIMIT)
                        self.close_connection = True
                        status = 0  # never answered
                        return
                    raise HttpError(fault_status, "stand-in: injected failure", {"Retry-After": "0"})
            for route_method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, path)
                if route_method == method and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if dataset and "repo" in params:
                        params["repo"] = f"datasets/{params['repo']}"
                    with self.hub._lock:
                        status = getattr(self, name)(body=body, **params)
                    break
            else:
                self.hub.unhandled.append(f"{method} {self.path}")
                raise HttpError(404, f"stand-in: no route for {method} {url.path}")
        except HttpError as error:
            status = error.status
            self._send_json(error.status, {"error": error.message}, error.headers)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a delayed answer)
            self.close_connection = True
            status = 0
        except Exception as error:  # a bug in the stand-in: answer, and keep the message for the test
            status = 500
            self.hub.unhandled.append(f"{method} {self.path}: {type(error).__name__}: {error}")
            self._send_json(500, {"error": f"stand-in crashed: {type(error).__name__}"})
        finally:
            self.hub.log.append((method, url.path, status))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise HttpError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                self.close_connection = True
                raise HttpError(413, "request body too large")
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after each chunk

    def _json_body(self, body: bytes) -> dict:
        try:
            value = json.loads(body or b"{}")
        except ValueError:
            raise HttpError(400, "body is not JSON") from None
        if not isinstance(value, dict):
            raise HttpError(400, "body is not a JSON object")
        return value

    def _send(self, status: int, payload: bytes, headers: dict[str, str], content_type: str) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        return status

    def _send_json(self, status: int, value, headers: dict[str, str] | None = None) -> int:
        return self._send(status, json.dumps(value).encode(), headers or {}, "application/json")

    def _user(self) -> User | None:
        return self.hub.user_for(self.headers.get("Authorization"))

    # ------------------------------------------------------------------ routes

    def _create_repo(self, body):
        user = self._user()
        try:
            return self._send_json(200, self.hub.create_repo(user, self._json_body(body)))
        except HttpError as error:
            if error.status != 409:
                raise
            # The Hub answers "already exists" with the repo URL in the body.
            return self._send_json(409, {"error": error.message, "url": error.headers["X-Url"]})

    def _validate_yaml(self, body):
        self._user()
        return self._send_json(200, self.hub.validate_yaml(self._json_body(body)))

    def _whoami(self, body):
        user = self._user()
        if user is None:
            raise HttpError(401, "Invalid username or password.")
        role = "write" if user.write else "read"
        return self._send_json(200, {"type": "user", "name": user.name, "auth": {"accessToken": {"role": role}}})

    def _agent_harnesses(self, body):
        # huggingface_hub's best-effort agent detection; an empty registry detects nothing.
        return self._send_json(200, {"standardEnvVars": [], "harnesses": {}})

    def _model_info(self, body, repo, rev="main"):
        found = self.hub.repo_for_read(repo, self._user())
        return self._send_json(200, self.hub.model_info(found, rev, self.query))

    def _tree(self, body, repo, rev, path=""):
        found = self.hub.repo_for_read(repo, self._user())
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        return self._send_json(200, self.hub.tree(found, rev, path, recursive))

    def _refs(self, body, repo):
        return self._send_json(200, self.hub.refs(self.hub.repo_for_read(repo, self._user())))

    def _create_branch(self, body, repo, rev):
        found = self.hub.repo_for_write(repo, self._user())
        return self._send_json(200, self.hub.create_branch(found, rev, self._json_body(body)))

    def _preupload(self, body, repo, rev):
        found = self.hub.repo_for_write(repo, self._user())
        return self._send_json(200, self.hub.preupload(found, rev, self._json_body(body)))

    def _commit(self, body, repo, rev):
        found = self.hub.repo_for_write(repo, self._user())
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise HttpError(400, "commit body is not NDJSON") from None
        return self._send_json(200, self.hub.commit(found, rev, lines, self.query))

    def _lfs_batch(self, body, repo):
        found = self.hub.repo_for_write(repo, self._user())
        payload = json.dumps(self.hub.lfs_batch(found, self._json_body(body))).encode()
        return self._send(200, payload, {}, "application/vnd.git-lfs+json")

    def _lfs_verify(self, body, repo):
        self.hub.repo_for_write(repo, self._user())
        return self._send_json(200, self.hub.lfs_verify(self._json_body(body)))

    def _lfs_put(self, body, oid):
        self.hub.lfs_put(oid, self.query.get("ticket", ""), body)
        return self._send(200, b"", {"ETag": f'"{oid}"'}, "text/plain")

    def _resolve(self, body, repo, rev, path):
        found = self.hub.repo_for_read(repo, self._user())
        entry, commit = self.hub.resolve(found, rev, path)
        etag = f'"{entry.sha256 if entry.lfs else entry.git_oid}"'
        headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "none"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(entry.size)})
        content = self.hub._read_blob(entry.sha256)
        return self._send(200, content, headers, "application/octet-stream")
