"""A small stand-in for the model hub, on 127.0.0.1, enough of its HTTP API for huggingface_hub to
resolve revisions and fetch files (`HF_ENDPOINT` points at it): repo info with file sizes, HEAD and
GET of `/{repo}/resolve/{revision}/{file}`, 404 with the hub's error codes for unknown repos,
revisions and files, 401 for a private repo without its token. It records every file it served."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]  # the main branch's files
    commit: str = ""
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit
    token: str | None = None  # a private repo answers only with this bearer token

    def __post_init__(self):
        self.commit = self.commit or hashlib.sha1(json.dumps(sorted(self.files)).encode()).hexdigest()
        self.branches = {"main": self.commit, **self.branches}


def repo_from_directory(directory: Path, **kwargs) -> Repo:
    return Repo({p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}, **kwargs)


class FakeHub:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.served: list[str] = []  # "org/name/file" of every GET of a file
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ---- the API ----
    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path).strip("/").split("/")
        if path[:2] == ["api", "models"]:
            repo_id, rest = "/".join(path[2:4]), path[4:]
            revision = rest[1] if rest[:1] in (["revision"], ["tree"]) else "main"
            self._info(handler, repo_id, revision, tree=rest[:1] == ["tree"])
        elif len(path) >= 5 and path[2] == "resolve":
            self._file(handler, "/".join(path[:2]), path[3], "/".join(path[4:]), body)
        else:
            self._error(handler, 404, "RepoNotFound")

    def _find(self, handler, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(handler, 404, "RepoNotFound")
            return None
        if repo.token is not None and handler.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(handler, 401, None)
            return None
        if revision not in repo.branches and revision not in repo.branches.values():
            self._error(handler, 404, "RevisionNotFound")
            return None
        return repo

    def _info(self, handler, repo_id: str, revision: str, tree: bool) -> None:
        """The repo's info (with its files' sizes), or its file tree (`/tree/{revision}`)."""
        repo = self._find(handler, repo_id, revision)
        if repo is None:
            return
        files = sorted(repo.files.items())
        if tree:
            answer = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                      for name, data in files]
        else:
            answer = {"id": repo_id, "modelId": repo_id, "sha": repo.branches.get(revision, revision),
                      "private": repo.token is not None,
                      "siblings": [{"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                                   for name, data in files]}
        self._send(handler, 200, json.dumps(answer).encode(), {"Content-Type": "application/json"}, body=True)

    def _file(self, handler, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._find(handler, repo_id, revision)
        if repo is None:
            return
        if name not in repo.files:
            self._error(handler, 404, "EntryNotFound")
            return
        data = repo.files[name]
        if body:
            self.served.append(f"{repo_id}/{name}")
        headers = {"X-Repo-Commit": repo.branches.get(revision, revision),
                   "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Content-Type": "application/octet-stream"}
        self._send(handler, 200, data, headers, body)

    def _error(self, handler, status: int, code: str | None) -> None:
        headers = {"X-Error-Code": code} if code else {}
        self._send(handler, status, json.dumps({"error": code or "unauthorized"}).encode(), headers, body=True)

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict, body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body and handler.command != "HEAD":
            handler.wfile.write(data)
