"""A loopback double of the Oxen hub's HTTP API, backed by real local Oxen repos.

The real `oxenai` client (its Rust core, unmodified) talks to this server as it would to
hub.oxen.ai, so tests exercise the pipeline's remote pull and push end to end without a network.
Each repo `namespace/name` is a real local Oxen repo under `<root>/namespace/name`; commits made
through the API are real commits there.

Implemented (the requests oxenai 0.65 makes for what the pipeline uses; shapes from the public
server source, crates/server/src/controllers/, and checked against the client's parser):

    GET  /api/repos/{ns}/{name}                          repo info
    GET  .../revisions/{branch or commit}[/{path}]       resolve a revision
    GET  .../branches, .../branches/{name}               branches
    POST .../branches                                     create a branch at a branch head
    GET  .../commits/history/{branch}?page&page_size     log
    GET  .../meta/{revision}/{path}                      file metadata (hash: xxh3-128 hex)
    GET  .../file/{revision}/{path}                      file download
    PUT  .../file/{branch}/{dir}                         upload files with one commit (multipart)
    PUT  .../workspaces, GET .../workspaces/{id}          workspace create / get
    POST .../workspaces/{id}/validate                    upload size check
    POST .../workspaces/{id}/files/{dir}                 stage files (multipart, gzipped parts)
    POST .../workspaces/{id}/commit/{branch}             commit the workspace, one commit
    POST .../commits/{id}/complete, .../action/...       bookkeeping, acknowledged

Not implemented: the chunked /versions uploads the client uses for files above its chunk size
(tests push small files), tree and merkle sync (clone/push/pull of whole repos), directory
listings, data frames, merges, repo creation; branches are created only at a branch head.

Test controls (not part of Oxen's API), under /_double/:
    POST seed      {"repo", "branch", "message", "files": {path: base64} | "folder"} -> {"commit_id"}
    POST fail      {"method", "path" (regex), "status", "times"}: answer matching requests with an error
    GET  requests  every API request seen: method, path, whether it carried the expected token
    GET  tree?repo=ns/name&branch=b   {"commits": [...], "files": {path: xxh3 hash}} of a branch

Run: python -m tests.oxen_hub_double --root DIR [--token T]; tests use `OxenHubDouble`.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar, Self
from urllib.parse import parse_qs, unquote, urlsplit

import oxen
import xxhash

FOUND = {"status": "success", "status_message": "resource_found"}


def error(message: str) -> dict:
    return {"status": "error", "status_message": message}


def content_hash(data: bytes) -> str:
    """Oxen's file hash: xxh3-128 of the bytes as lower-case hex without leading zeros."""
    return format(xxhash.xxh3_128_intdigest(data), "x")


def rfc3339(timestamp: str) -> str:
    """'2026-11-26 13:14:33.654242682 +00:00:00' (the Python binding's form) -> RFC 3339."""
    date, clock, offset = timestamp.split()
    hours, minutes = offset[1:].split(":")[:2]
    return f"{date}T{clock}{offset[0]}{hours}:{minutes}"


def commit_view(commit) -> dict:
    return {
        "id": commit.id, "parent_ids": list(commit.parent_ids), "message": commit.message,
        "author": commit.author, "email": commit.email, "timestamp": rfc3339(commit.timestamp),
    }  # fmt: skip


def parse_multipart(content_type: str, body: bytes) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """(files as (filename, bytes), plain fields) of a multipart/form-data body."""
    boundary = re.search(r"boundary=([^;]+)", content_type)[1].strip('"').encode()
    files, fields = [], {}
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        filename = re.search(rb'filename="([^"]*)"', head)
        name = re.search(rb'name="([^"]*)"', head)
        if filename:
            files.append((filename[1].decode(), gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data))
        elif name:
            fields[name[1].decode()] = data.decode()
    return files, fields


class Repos:
    """The backing repos. Every method runs under one lock: a local Oxen repo has one working tree."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        self.workspaces: dict[str, dict] = {}

    def open(self, repo_id: str) -> oxen.Repo | None:
        path = self.root / repo_id
        return oxen.Repo(str(path)) if (path / ".oxen").is_dir() else None

    @staticmethod
    def branches(repo) -> dict[str, str]:
        return {b.name: b.commit_id for b in repo.branches()}

    @staticmethod
    def history(repo, branch: str) -> list[dict]:
        original = repo.current_branch.name
        repo.checkout(branch)
        try:
            return [commit_view(c) for c in repo.log()]
        finally:
            repo.checkout(original)

    def commit(self, repo, commit_id: str) -> dict | None:
        for branch in self.branches(repo):
            for commit in self.history(repo, branch):
                if commit["id"] == commit_id:
                    return commit
        return None

    def resolve(self, repo, resource: str) -> dict | None:
        """'<branch or commit>[/<path>]' -> a ParsedResourceView; the longest branch name wins."""
        branches = self.branches(repo)
        for name in sorted(branches, key=len, reverse=True):
            if resource == name or resource.startswith(name + "/"):
                return {
                    "workspace": None, "commit": self.commit(repo, branches[name]),
                    "branch": {"name": name, "commit_id": branches[name]},
                    "path": resource[len(name) :].lstrip("/"), "version": name, "resource": resource,
                }  # fmt: skip
        version, _, path = resource.partition("/")
        commit = self.commit(repo, version)
        if commit is None:
            return None
        return {"workspace": None, "commit": commit, "branch": None, "path": path, "version": version,
                "resource": resource}  # fmt: skip

    def read_file(self, repo, revision: str, path: str) -> bytes | None:
        """A file's bytes at a branch or commit: restored into the working tree, read, put back."""
        branches = self.branches(repo)
        commit_id = branches.get(revision, revision)
        target = Path(repo.path) / path
        existed = target.is_file()
        try:
            repo.restore(path, source=commit_id)
        except ValueError:
            return None
        data = target.read_bytes() if target.is_file() else None
        if existed:
            repo.restore(path, source=branches[repo.current_branch.name])
        elif target.exists():
            target.unlink()
        return data

    def commit_files(self, repo, branch: str, files: dict[str, bytes], message: str, author: str, email: str):
        """One commit of `files` on `branch`, by `author`."""
        oxen.user.config_user(author, email)
        original = repo.current_branch.name
        repo.checkout(branch)
        try:
            root = Path(repo.path)
            for name, data in sorted(files.items()):
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
                repo.add(str(root / name))
            return repo.commit(message)
        finally:
            repo.checkout(original)

    def seed(self, repo_id: str, branch: str, message: str, files: dict[str, bytes]) -> str:
        """Commit `files` to `branch` (created from main's head when missing; the repo too)."""
        path = self.root / repo_id
        repo = self.open(repo_id)
        oxen.user.config_user("hub-double", "hub-double@localhost")
        if repo is None:
            path.mkdir(parents=True, exist_ok=True)
            repo = oxen.Repo(str(path))
            repo.init()
        elif branch not in self.branches(repo):
            repo.checkout("main")
            repo.checkout(branch, create=True)
            repo.checkout("main")
        if not self.branches(repo):  # a new repo: the first commit makes main
            for name, data in sorted(files.items()):
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                (path / name).write_bytes(data)
                repo.add(str(path / name))
            return repo.commit(message).id
        return self.commit_files(repo, branch, files, message, "hub-double", "hub-double@localhost").id

    def tree(self, repo_id: str, branch: str) -> dict:
        repo = self.open(repo_id)
        original = repo.current_branch.name
        repo.checkout(branch)
        try:
            root = Path(repo.path)
            files = {
                p.relative_to(root).as_posix(): content_hash(p.read_bytes())
                for p in sorted(root.rglob("*"))
                if p.is_file() and ".oxen" not in p.relative_to(root).parts
            }
            return {"commits": [commit_view(c) for c in repo.log()], "files": files}
        finally:
            repo.checkout(original)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    repos: ClassVar[Repos]  # serve() binds these four in a subclass
    token: ClassVar[str | None] = None
    faults: ClassVar[list[dict]] = []
    seen: ClassVar[list[dict]] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self):
        self._serve()

    do_POST = do_PUT = do_DELETE = do_GET

    # ---- plumbing ----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        path = unquote(url.path)
        try:
            if path.startswith("/_double/"):
                return self._control(path.removeprefix("/_double/"), parse_qs(url.query), body)
            authorized = self.token is None or self.headers.get("Authorization") == f"Bearer {self.token}"
            self.seen.append({"method": self.command, "path": path, "authorized": authorized})
            for fault in self.faults:
                if fault["times"] > 0 and fault["method"] == self.command and re.search(fault["path"], path):
                    fault["times"] -= 1
                    return self._json(fault["status"], error("injected_fault"))
            if not authorized:
                return self._json(401, error("unauthenticated"))
            match = re.fullmatch(r"/api/repos/([^/]+/[^/]+)(/.*)?", path)
            if not match:
                return self._json(404, error("resource_not_found"))
            with self.repos.lock:
                repo = self.repos.open(match[1])
                if repo is None:
                    return self._json(404, error("resource_not_found"))
                return self._api(repo, match[1], match[2] or "", parse_qs(url.query), body)
        except Exception as exc:  # noqa: BLE001 - a bug in the double is a 500 with its message, not a hang
            return self._json(500, error(f"double: {type(exc).__name__}: {exc}"))

    def _control(self, name: str, query: dict, body: bytes) -> None:
        if name == "seed":
            request = json.loads(body)
            files = {k: base64.b64decode(v) for k, v in request.get("files", {}).items()}
            if request.get("folder"):
                folder = Path(request["folder"])
                files |= {
                    p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
                }
            with self.repos.lock:
                commit_id = self.repos.seed(
                    request["repo"], request.get("branch", "main"), request["message"], files
                )
            return self._json(200, {"commit_id": commit_id})
        if name == "fail":
            self.faults.append(json.loads(body))
            return self._json(200, {})
        if name == "requests":
            return self._json(200, self.seen)
        if name == "tree":
            with self.repos.lock:
                return self._json(200, self.repos.tree(query["repo"][0], query["branch"][0]))
        return self._json(404, error("resource_not_found"))

    # ---- the Oxen API ------------------------------------------------------------------------

    def _api(self, repo, repo_id: str, rest: str, query: dict, body: bytes) -> None:
        repos, method = self.repos, self.command
        namespace, name = repo_id.split("/")
        branches = repos.branches(repo)
        if rest == "" and method == "GET":
            return self._json(200, FOUND | {"repository": {
                "namespace": namespace, "name": name, "size": 0, "data_types": [], "min_version": "0.36.0",
                "is_empty": not branches, "storage_kind": "local"}})  # fmt: skip
        if (m := re.fullmatch(r"/revisions/(.+)", rest)) and method == "GET":
            resource = repos.resolve(repo, m[1])
            return self._json(200, FOUND | {"resource": resource}) if resource else self._not_found()
        if rest == "/branches" and method == "GET":
            return self._json(
                200, FOUND | {"branches": [{"name": k, "commit_id": v} for k, v in branches.items()]}
            )
        if (m := re.fullmatch(r"/branches/(.+)", rest)) and method == "GET":
            if m[1] not in branches:
                return self._not_found()
            return self._json(200, FOUND | {"branch": {"name": m[1], "commit_id": branches[m[1]]}})
        if rest == "/branches" and method == "POST":
            return self._create_branch(repo, branches, json.loads(body))
        if (m := re.fullmatch(r"/commits/history/(.+)", rest)) and method == "GET":
            return self._history(repo, branches, m[1], query)
        if (m := re.fullmatch(r"/meta/([^/]+)/(.+)", rest)) and method == "GET":
            return self._meta(repo, branches, m[1], m[2])
        if (m := re.fullmatch(r"/file/([^/]+)/(.+)", rest)) and method == "GET":
            data = repos.read_file(repo, m[1], m[2])
            if data is None:
                return self._not_found()
            return self._send(
                200, data, "application/octet-stream", {"oxen-revision-id": branches.get(m[1], m[1])}
            )
        if (m := re.fullmatch(r"/file/([^/]+)(?:/(.*))?", rest)) and method == "PUT":
            return self._put_files(repo, branches, m[1], m[2] or "", body)
        if rest == "/workspaces" and method == "PUT":
            return self._create_workspace(repo, branches, json.loads(body))
        if (m := re.fullmatch(r"/workspaces/([^/]+)", rest)) and method == "GET":
            workspace = repos.workspaces.get(m[1])
            return (
                self._json(200, FOUND | {"workspace": self._workspace_view(repo, workspace)})
                if workspace
                else self._not_found()
            )
        if (m := re.fullmatch(r"/workspaces/([^/]+)", rest)) and method == "DELETE":
            workspace = repos.workspaces.pop(m[1], None)
            if workspace is None:
                return self._not_found()
            return self._json(200, FOUND | {"workspace": self._workspace_view(repo, workspace)})
        if re.fullmatch(r"/workspaces/[^/]+/validate", rest) and method == "POST":
            return self._json(200, FOUND)
        if (m := re.fullmatch(r"/workspaces/([^/]+)/files/?(.*)", rest)) and method == "POST":
            return self._stage_files(m[1], m[2], body)
        if (m := re.fullmatch(r"/workspaces/([^/]+)/commit/(.+)", rest)) and method == "POST":
            return self._commit_workspace(repo, branches, m[1], m[2], json.loads(body))
        if re.fullmatch(r"/commits/[^/]+/complete", rest) and method == "POST":
            return self._json(200, FOUND)
        if rest.startswith("/action/") and method == "POST":
            return self._json(200, FOUND)
        return self._not_found()

    def _not_found(self) -> None:
        self._json(404, error("resource_not_found"))

    def _create_branch(self, repo, branches: dict, request: dict) -> None:
        new, commit_id = request["new_name"], request["commit_id"]
        if new not in branches:
            source = [b for b, c in branches.items() if c == commit_id]
            if not source:  # a local repo can branch from a branch head only
                return self._json(400, error(f"double: {commit_id} is not a branch head"))
            original = repo.current_branch.name
            repo.checkout(source[0])
            repo.checkout(new, create=True)
            repo.checkout(original)
        return self._json(200, FOUND | {"branch": {"name": new, "commit_id": self.repos.branches(repo)[new]}})

    def _history(self, repo, branches: dict, revision: str, query: dict) -> None:
        """The log of a branch, or of the history ending at a commit id."""
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["10"])[0])
        commits = []
        for branch in [revision] if revision in branches else list(branches):
            ids = [c["id"] for c in self.repos.history(repo, branch)]
            if revision in branches or revision in ids:
                commits = self.repos.history(repo, branch)[
                    0 if revision in branches else ids.index(revision) :
                ]
                break
        if not commits:
            return self._not_found()
        return self._json(200, FOUND | {
            "commits": commits[(page - 1) * size : page * size], "page_number": page, "page_size": size,
            "total_pages": max(1, -(-len(commits) // size)), "total_entries": len(commits),
        })  # fmt: skip

    def _meta(self, repo, branches: dict, revision: str, path: str) -> None:
        data = self.repos.read_file(repo, revision, path)
        if data is None:
            return self._not_found()
        return self._json(200, FOUND | {"entry": {
            "filename": Path(path).name, "hash": content_hash(data), "is_dir": False,
            "latest_commit": self.repos.commit(repo, branches.get(revision, revision)), "resource": None,
            "size": len(data), "data_type": "binary", "mime_type": "application/octet-stream",
            "extension": Path(path).suffix.lstrip("."), "metadata": None, "is_queryable": False,
        }})  # fmt: skip

    def _put_files(self, repo, branches: dict, branch: str, directory: str, body: bytes) -> None:
        if branch not in branches:
            return self._not_found()
        files, fields = parse_multipart(self.headers["Content-Type"], body)
        named = {(Path(directory) / name).as_posix(): data for name, data in files}
        commit = self.repos.commit_files(
            repo,
            branch,
            named,
            fields.get("message", "Upload"),
            fields.get("name", "unknown"),
            fields.get("email", ""),
        )
        return self._json(200, FOUND | {"commit": commit_view(commit)})

    def _workspace_view(self, repo, workspace: dict) -> dict:
        return {"id": workspace["id"], "name": workspace["name"], "metadata": None,
                "commit": self.repos.commit(repo, workspace["commit_id"])}  # fmt: skip

    def _create_workspace(self, repo, branches: dict, request: dict) -> None:
        if request["branch_name"] not in branches:
            return self._not_found()
        workspace = self.repos.workspaces.setdefault(request["workspace_id"], {
            "id": request["workspace_id"], "name": request.get("name"), "branch": request["branch_name"],
            "commit_id": branches[request["branch_name"]], "files": {},
        })  # fmt: skip
        return self._json(200, FOUND | {"workspace": self._workspace_view(repo, workspace)})

    def _stage_files(self, workspace_id: str, directory: str, body: bytes) -> None:
        workspace = self.repos.workspaces.get(workspace_id)
        if workspace is None:
            return self._not_found()
        files, _ = parse_multipart(self.headers["Content-Type"], body)
        paths = []
        for name, data in files:
            path = (Path(directory) / name).as_posix() if directory else name
            workspace["files"][path] = data
            paths.append(path)
        return self._json(200, FOUND | {"paths": paths, "err_files": []})

    def _commit_workspace(self, repo, branches: dict, workspace_id: str, branch: str, request: dict) -> None:
        workspace = self.repos.workspaces.get(workspace_id)
        if workspace is None or branch not in branches:
            return self._not_found()
        if branches[branch] != workspace["commit_id"]:  # the branch moved on: the real hub would merge
            return self._json(409, error("double: branch moved since the workspace was created"))
        if not workspace["files"]:
            return self._json(400, error("double: no changes to commit"))
        commit = self.repos.commit_files(
            repo, branch, workspace["files"], request["message"], request["author"], request["email"]
        )
        if workspace["name"] is None:  # unnamed workspaces end with their commit
            del self.repos.workspaces[workspace_id]
        return self._json(200, FOUND | {"commit": commit_view(commit)})


def serve(root: Path, port: int = 0, token: str | None = None) -> ThreadingHTTPServer:
    handler = type(
        "BoundHandler", (Handler,), {"repos": Repos(root), "token": token, "faults": [], "seen": []}
    )
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


class OxenHubDouble:
    """The double in a subprocess (Oxen repos allow one process each, and the client holds the GIL
    while it waits): `with OxenHubDouble(tmp_path) as hub: ... hub.host ...`."""

    def __init__(self, root: Path, token: str | None = None):
        self.root = Path(root)
        self.token = token
        self.process: subprocess.Popen | None = None
        self.host = ""

    def __enter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tests.oxen_hub_double", "--root", str(self.root)]
        env = dict(os.environ, HOME=str(self.root / ".home"))  # its own Oxen user config
        if self.token:
            env["OXEN_HUB_DOUBLE_TOKEN"] = self.token  # not on the command line, where ps shows it
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, env=env, text=True, cwd=Path(__file__).resolve().parent.parent
        )
        line = self.process.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"oxen hub double did not start: {line!r}")
        self.host = line.split()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def _call(self, method: str, name: str, payload=None, query: str = ""):
        import urllib.request

        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            f"http://{self.host}/_double/{name}{query}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def seed(self, repo: str, files: dict[str, bytes] | None = None, folder: Path | None = None,
             message: str = "seed", branch: str = "main") -> str:  # fmt: skip
        encoded = {k: base64.b64encode(v).decode() for k, v in (files or {}).items()}
        payload = {"repo": repo, "branch": branch, "message": message, "files": encoded,
                   "folder": str(folder) if folder else None}  # fmt: skip
        return self._call("POST", "seed", payload)["commit_id"]

    def fail(self, method: str, path: str, status: int = 500, times: int = 1) -> None:
        self._call("POST", "fail", {"method": method, "path": path, "status": status, "times": times})

    def requests(self) -> list[dict]:
        return self._call("GET", "requests")

    def tree(self, repo: str, branch: str) -> dict:
        return self._call("GET", "tree", query=f"?repo={repo}&branch={branch}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="folder holding <namespace>/<name> repos")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = serve(args.root, args.port, os.environ.get("OXEN_HUB_DOUBLE_TOKEN"))
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
