"""A small Hugging Face Hub-compatible HTTP server for tests (no internet).

It implements the calls the real ``huggingface_hub`` client makes for what litepatch uses, read from
the client's source (``hf_api.py``, ``_commit_api.py``, ``file_download.py``, ``utils/_http.py``):

* ``POST /api/repos/create``: create a model repo (409 when it exists; ``create_repo(exist_ok=True)``).
* ``POST /api/validate-yaml``: README metadata check done by ``create_commit`` (always valid here).
* ``POST /api/models/{repo}/preupload/{revision}``: every file is uploaded ``regular`` (inline base64).
* ``POST /api/models/{repo}/commit/{revision}``: the NDJSON commit (``header`` + ``file`` lines);
  answers ``commitOid``/``commitUrl``.
* ``GET /api/models/{repo}[/revision/{revision}]``: ``model_info``/``repo_info``.
* ``HEAD``/``GET /{repo}/resolve/{revision}/{filename}``: file download with ``X-Repo-Commit`` and
  ``ETag``; 404s carry ``X-Error-Code`` ``RepoNotFound``/``RevisionNotFound``/``EntryNotFound`` as
  on the real Hub, which is how the client picks its error class.

Revisions are branches, tags or full commit shas. ``token`` makes every request require
``Authorization: Bearer <token>`` (401 otherwise). The server runs in a daemon thread:

    >>> with HubServer() as hub:              # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.url

Run as a script (``python tests/hub_server.py PORTFILE``) it serves until killed and writes its URL to
PORTFILE, so that several processes can share one Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    messages: dict[str, str] = field(default_factory=dict)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.token: str | None = None
        self.fail_status: int | None = None  # answer every request with this status (server errors)
        # hostile behaviours for the adversarial tests
        self.delay: float = 0.0  # seconds before answering each request
        self.drip: float = 0.0  # seconds between the bytes of a file body
        self.commit_header: str | None = None  # replaces X-Repo-Commit of file answers
        self.drop_etag: bool = False  # file answers without an ETag
        self.truncate: bool = False  # file bodies announce their length, send half of it and close

    def create(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(private=private)
        sha = hashlib.sha1(f"init {repo_id} {time.time_ns()}".encode()).hexdigest()
        repo.commits[sha] = {".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n"}
        repo.branches["main"] = sha
        repo.messages[sha] = "initial commit"
        self.repos[repo_id] = repo
        return repo

    def resolve(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        return None

    def put(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Commits ``files`` (raw bytes, unchecked: hostile content is the point) to main; returns the sha."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create(repo_id)
            parent = repo.branches["main"]
            sha = hashlib.sha1(f"{parent} put {time.time_ns()}".encode()).hexdigest()
            repo.commits[sha] = {**repo.commits[parent], **files}
            repo.messages[sha] = "put"
            repo.branches["main"] = sha
            return sha

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        repo = self.repos[repo_id]
        sha = self.resolve(repo, revision)
        repo.tags[tag] = sha
        return sha


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"
    protocol_version = "HTTP/1.1"

    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    # ------------------------------------------------------------------ helpers
    def _segments(self) -> list[str]:
        path = urlsplit(self.path).path
        return [unquote(s) for s in path.split("/") if s != ""]

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        if self.state.delay:
            time.sleep(self.state.delay)
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head or not body:
            return
        if self.state.truncate and status == 200:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.state.drip and status == 200:
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(self.state.drip)
            return
        self.wfile.write(body)

    def _json(self, status: int, obj: object, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False, extra: dict | None = None):
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    def _authorized(self, head: bool = False) -> bool:
        if self.state.fail_status is not None:
            self._error(self.state.fail_status, None, "Internal Error - We're working hard to fix this", head)
            return False
        if self.state.token is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.state.token}":
            return True
        # like the real Hub: reads of a private repo look like a missing repo, writes are plain 401s
        code = "RepoNotFound" if self.command in ("GET", "HEAD") else None
        self._error(401, code, "Invalid username or password.", head)
        return False

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
        return repo

    def _revision(self, repo_id: str, revision: str, head: bool = False) -> tuple[Repo, str] | None:
        """``(repo, commit sha)``, or ``None`` after answering 404 for a missing repo or revision."""
        repo = self._repo(repo_id, head)
        if repo is None:
            return None
        sha = self.state.resolve(repo, revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return None
        return repo, sha

    # ------------------------------------------------------------------ verbs
    def do_HEAD(self) -> None:  # noqa: N802
        self.state.requests.append(("HEAD", self.path))
        self._resolve_file(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self.state.requests.append(("GET", self.path))
        seg = self._segments()
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            return self._model_info(seg)
        return self._resolve_file(head=False)

    def do_POST(self) -> None:  # noqa: N802
        self.state.requests.append(("POST", self.path))
        body = self._body()
        if not self._authorized():
            return
        seg = self._segments()
        if seg == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if seg == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []})
        if seg[:2] == ["api", "models"] and len(seg) >= 6 and seg[4] in ("preupload", "commit"):
            repo_id, action, revision = f"{seg[2]}/{seg[3]}", seg[4], "/".join(seg[5:])
            with self.state.lock:
                if action == "preupload":
                    return self._preupload(repo_id, revision, json.loads(body))
                return self._commit(repo_id, revision, body)
        return self._error(404, None, f"no such endpoint {self.path}")

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:  # the real Hub answers the url with its 409 too; create_repo reads it
                url = f"{self.server.url}/{repo_id}"  # type: ignore[attr-defined]
                message = "You already created this model repo"
                return self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
            self.state.create(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})  # type: ignore[attr-defined]

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        found = self._revision(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": _git_oid(files[f["path"]]) if f["path"] in files else None,
            }
            for f in payload["files"]
        ]
        return self._json(200, {"files": answer, "commitOid": sha})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision} (commits go to branches)")
        parent = repo.branches[revision]
        files = dict(repo.commits[parent])
        summary = ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"]
            elif item["key"] == "file":
                value = item["value"]
                assert value["encoding"] == "base64", value
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            else:
                return self._error(400, None, f"unsupported commit operation {item['key']}")
        sha = hashlib.sha1(f"{parent} {summary} {time.time_ns()}".encode() + repr(sorted(files.items())).encode())
        sha = sha.hexdigest()
        repo.commits[sha] = files
        repo.messages[sha] = summary
        repo.branches[revision] = sha
        url = f"{self.server.url}/{repo_id}/commit/{sha}"  # type: ignore[attr-defined]
        return self._json(200, {"commitOid": sha, "commitUrl": url, "success": True, "pullRequestUrl": None})

    def _model_info(self, seg: list[str]) -> None:
        if not self._authorized():
            return
        repo_id = f"{seg[2]}/{seg[3]}"
        revision = "/".join(seg[5:]) if len(seg) > 5 and seg[4] == "revision" else "main"
        found = self._revision(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
        return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

    def _resolve_file(self, head: bool) -> None:
        if not self._authorized(head):
            return
        seg = self._segments()
        if len(seg) < 5 or seg[2] != "resolve":
            return self._error(404, None, f"no such endpoint {self.path}", head)
        repo_id, revision, filename = f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:])
        found = self._revision(repo_id, revision, head)
        if found is None:
            return
        repo, sha = found
        content = repo.commits[sha].get(filename)
        if content is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", head, {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": self.state.commit_header or sha, "Content-Type": "text/plain"}
        if not self.state.drop_etag:
            headers["ETag"] = f'"{_git_oid(content)}"'
        return self._send(200, content, headers, head)


class HubServer:
    """A fake Hub on 127.0.0.1 in a daemon thread; ``url`` is its endpoint, ``state`` its repositories."""

    def __init__(self, port: int = 0) -> None:
        self.state = HubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self.state  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.url = self.url  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-hub", daemon=True)

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    server = HubServer().start()
    with open(sys.argv[1], "w") as f:
        f.write(server.url)
    server.thread.join()
