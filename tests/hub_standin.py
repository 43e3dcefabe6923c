"""A stand-in for the Hugging Face Hub, for the store's tests: the HfApi surface that
`store_backends.HubBackend` uses, its state in a folder so that several processes (a notebook and its
spawned training processes) share one Hub, with the behaviour of the real one that the store must cope
with:

- one commit at a time per repo: a commit that overlaps another gets 409 "another commit operation is in
  progress" (a lock file is held for the commit's duration, so the overlap is real across processes);
- a commit whose `parent_commit` is not the head gets 412; deleting a file that is not there, 404;
- a budget of commits per repo and hour (429 past it);
- faults planned ahead on any call: `hub.fail("create_commit", status=503, nth=3)` (the 3rd call from
  now on, counted over all processes), `hub.fail("repo_info", timeout=True)` (the next call),
  `hub.fail("create_commit", hold=0.5)` (a slow commit that holds the lock), `overlap=True` (it holds the
  lock until another commit has met it: a 409 that does not depend on timing), `kill=True` (the process
  that made the commit is SIGKILLed right after it is in: a session that dies before hearing back);
  `match="init.safetensors"` counts only the commits whose message names it;
- a journal of every call (`calls`) and of every refusal (`refusals`: 409, 412, 429, planned faults);
- a listing is the state when it was made: a client that keeps one does not see later commits;
- file sizes, and a history that keeps every committed file's bytes until `super_squash_history` frees
  those only old commits use (`used_storage`, as `repo_info` reports it).

Errors are the real classes, raised by huggingface_hub's own `hf_raise_for_status` from a response with
the status code (HfHubHTTPError, RepositoryNotFoundError, RemoteEntryNotFoundError), and the HTTP
library's own timeout. `hub.install(monkeypatch)` makes `huggingface_hub.HfApi`, `hf_hub_download` and
`whoami` this Hub's; a client (`hub.api(token)`) pickles, so spawned processes reach the same Hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import io
import json
import os
import signal
import time
from pathlib import Path

from huggingface_hub.errors import HTTPError
from huggingface_hub.utils import hf_raise_for_status

http = importlib.import_module(HTTPError.__module__.split(".")[0])  # the HTTP library huggingface_hub uses
URL = "https://huggingface.co/api/models"
MESSAGES = {
    409: "another commit operation is in progress on this repo, retry later",
    412: "A commit has happened since. Please refresh and try again.",
    429: "You have exceeded the rate limit for repository commits ({} per hour)",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
TOKENS = {"hf_x": ("me", True), "hf_read_only": ("me", False), "hf_other": ("someone", True)}


class StandInHub:
    """The Hub's side: repos, blobs, the fault plan and a journal of every call, in `folder`."""

    def __init__(self, folder: str | Path, tokens: dict | None = None, commits_per_hour: int = 128):
        self.folder = Path(folder)
        (self.folder / "blobs").mkdir(parents=True, exist_ok=True)
        (self.folder / "locks").mkdir(exist_ok=True)
        if not (self.folder / "state.json").exists():
            state = {"repos": {}, "calls": [], "counts": {}, "faults": [], "budget": commits_per_hour}
            state["refusals"] = []
            state["tokens"] = {t: list(v) for t, v in (tokens or TOKENS).items()}
            _write(self.folder / "state.json", state)

    def api(self, token: str | None = None) -> StandInApi:
        """A client, as `HfApi(token=token)` is."""
        return StandInApi(self.folder, token)

    def install(self, monkeypatch, sleeps: list | None = None) -> StandInHub:
        """Point huggingface_hub's HfApi, hf_hub_download and whoami at this Hub (in this process), and make
        the store's retries wait no time, the waits it asked for appended to `sleeps`."""
        import huggingface_hub

        import store_backends

        sleeps = [] if sleeps is None else sleeps
        monkeypatch.setattr(store_backends, "BACKOFF", store_backends.Backoff(sleep=sleeps.append))

        monkeypatch.setattr(huggingface_hub, "HfApi", _Factory(self.folder))
        monkeypatch.setattr(
            huggingface_hub,
            "hf_hub_download",
            lambda *a, token=None, **k: self.api(token).hf_hub_download(*a, **k),
        )
        monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: self.api(token).whoami())
        return self

    def fail(
        self,
        call: str,
        nth: int = 1,
        status: int | None = None,
        timeout: bool = False,
        hold: float = 0.0,
        times: int = 1,
        overlap: bool = False,
        kill: bool = False,
        match: str = "",
    ) -> None:
        """Plan a fault for the `nth` call of `call` from now on (all processes), and the `times - 1` after
        it: an HTTP `status`, a timeout, (`hold`) a commit that holds the repo's lock that long, or with
        `overlap` until another commit has met the lock (409), at most `hold` seconds; `kill`: SIGKILL the
        calling process once its commit is in. With `match`, only commits whose message holds it count."""
        with self._state() as state:
            first = state["counts"].get(_counter(call, match), 0) + nth
            fault = {"call": call, "status": status, "timeout": timeout, "hold": hold, "match": match}
            fault.update(overlap=overlap, kill=kill)
            state["faults"] += [{**fault, "at": first + k} for k in range(times)]

    def clear_faults(self) -> None:
        """Drop the faults still planned (an outage ends)."""
        with self._state() as state:
            state["faults"] = []

    def files(self, repo: str) -> dict[str, bytes]:
        """The repo's files at its head, with their bytes."""
        state = _read(self.folder / "state.json")
        head = state["repos"][repo]["history"][-1]["files"]
        return {path: (self.folder / "blobs" / blob).read_bytes() for path, (blob, _) in head.items()}

    def put(self, repo: str, files: dict[str, bytes]) -> None:
        """Make `repo` (owned by its owner) hold `files`, as one commit."""
        tokens = _read(self.folder / "state.json")["tokens"]
        client = self.api(next(t for t, (user, w) in tokens.items() if w and user == repo.split("/")[0]))
        client.create_repo(repo, exist_ok=True, private=True)
        ops = [_Add(path, data) for path, data in files.items()]
        client.create_commit(repo, ops, commit_message="put")

    def commits(self, repo: str) -> list[dict]:
        """The repo's history, oldest first: each commit's sha, message and the files it added/deleted."""
        out, before = [], {}
        for commit in _read(self.folder / "state.json")["repos"][repo]["history"]:
            now = commit["files"]
            added = sorted(p for p in now if before.get(p) != now[p])
            out.append(
                {
                    "sha": commit["sha"],
                    "message": commit["message"],
                    "added": added,
                    "deleted": sorted(set(before) - set(now)),
                }
            )
            before = now
        return out

    def calls(self, name: str | None = None) -> list[dict]:
        """Every call made so far (by any process), or those of one method."""
        calls = _read(self.folder / "state.json")["calls"]
        return [c for c in calls if name is None or c["call"] == name]

    def refusals(self, status: int | None = None) -> list[dict]:
        """Every call the Hub refused (by any process): its name, status, commit message and pid."""
        refused = _read(self.folder / "state.json").get("refusals", [])
        return [r for r in refused if status is None or r["status"] == status]

    def used_storage(self, repo: str) -> int:
        return _used(self.folder, _read(self.folder / "state.json")["repos"][repo])

    @contextlib.contextmanager
    def _state(self):
        with _locked(self.folder) as state:
            yield state


class _Factory:
    """`huggingface_hub.HfApi` while the stand-in is installed: HfApi(token=...) gives a client."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, token: str | None = None, **_) -> StandInApi:
        return StandInApi(self.folder, token)

    def __or__(self, other):  # `HfApi | None`, as transformers annotates at import (after a sitecustomize)
        import typing

        return typing.Union[StandInApi, other]  # noqa: UP007


class _Add:
    """A CommitOperationAdd of bytes, for `StandInHub.put`."""

    def __init__(self, path_in_repo: str, data: bytes):
        self.path_in_repo, self.path_or_fileobj = path_in_repo, data


class StandInApi:
    """The client: the HfApi methods the store calls, with HfApi's signatures."""

    def __init__(self, folder: str | Path, token: str | None = None):
        self.folder, self.token = Path(folder), token

    # ---- reading ---------------------------------------------------------------------------------------
    def whoami(self, token: str | None = None) -> dict:
        with self._call("whoami", None) as (state, _, _):
            return {"name": self._user(state, token or self.token)[0], "type": "user"}

    def repo_info(self, repo_id: str, *, files_metadata: bool = False, **_):
        from huggingface_hub.hf_api import ModelInfo

        with self._call("repo_info", repo_id) as (state, repo, _):
            head = repo["history"][-1]
            siblings = [
                {"rfilename": p, **({"size": n} if files_metadata else {})}
                for p, (_, n) in head["files"].items()
            ]
            return ModelInfo(
                id=repo_id,
                sha=head["sha"],
                private=repo["private"],
                siblings=siblings,
                usedStorage=_used(self.folder, repo),
            )

    def list_repo_files(self, repo_id: str, **_) -> list[str]:
        with self._call("list_repo_files", repo_id) as (state, repo, _):
            return sorted(repo["history"][-1]["files"])

    def list_repo_tree(self, repo_id: str, recursive: bool = False, **_) -> list:
        from huggingface_hub.hf_api import RepoFile

        with self._call("list_repo_tree", repo_id) as (state, repo, _):
            files = repo["history"][-1]["files"].items()
            return [RepoFile(path=p, size=n, oid=blob) for p, (blob, n) in sorted(files)]

    def hf_hub_download(self, repo_id: str, filename: str, *, local_dir=None, revision=None, **_) -> str:
        with self._call("hf_hub_download", repo_id) as (state, repo, _):
            entry = repo["history"][-1]["files"].get(filename)
            if entry is None:
                _raise(
                    404,
                    "GET",
                    f"https://huggingface.co/{repo_id}/resolve/main/{filename}",
                    "Entry not found",
                    "EntryNotFound",
                )
            target = Path(local_dir or self.folder / "downloads") / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self.folder / "blobs" / entry[0]).read_bytes())
            return str(target)

    # ---- writing ---------------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **kw):
        from huggingface_hub.hf_api import RepoUrl

        details = {"private": private, "exist_ok": exist_ok, **kw}
        with self._call("create_repo", repo_id, must_exist=False, **details) as (state, _, _):
            user, can_write = self._user(state, self.token)
            if not can_write or repo_id.split("/")[0] != user:
                _raise(
                    403,
                    "POST",
                    f"{URL}/repos/create",
                    "You don't have the rights to create a model under this namespace",
                )
            if repo_id in state["repos"]:
                if not exist_ok:
                    _raise(409, "POST", f"{URL}/repos/create", "You already created this model repo")
            else:
                first = {"sha": _sha("init", repo_id, time.time()), "message": "initial commit", "files": {}}
                state["repos"][repo_id] = {"private": bool(private), "history": [first], "commit_times": []}
            return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(
        self, repo_id: str, operations, *, commit_message: str, parent_commit: str | None = None, **_
    ):
        from huggingface_hub import CommitOperationDelete
        from huggingface_hub.hf_api import CommitInfo

        operations = list(operations)
        url = f"{URL}/{repo_id}/commit/main"
        with self._commit("create_commit", repo_id, url, commit_message) as (state, repo, fault):
            head = repo["history"][-1]
            stale = parent_commit is not None and parent_commit != head["sha"]
            files = {} if stale else dict(head["files"])
            for op in [] if stale else operations:
                if isinstance(op, CommitOperationDelete):
                    if files.pop(op.path_in_repo, None) is None:
                        _raise(404, "POST", url, f"File not found: {op.path_in_repo}", "EntryNotFound")
                else:
                    files[op.path_in_repo] = self._blob(op.path_or_fileobj)
            if not stale:
                sha = _sha(head["sha"], commit_message, sorted(files.items()))
                repo["history"].append({"sha": sha, "message": commit_message, "files": files})
                repo["commit_times"].append(time.time())
        if stale:
            _refused(self.folder, "create_commit", 412, commit_message)
            _raise(412, "POST", url, MESSAGES[412])
        if fault.get("kill"):  # the commit is in; the session dies before it hears back
            os.kill(os.getpid(), signal.SIGKILL)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}",
            commit_message=commit_message,
            commit_description="",
            oid=sha,
        )

    def upload_file(
        self,
        *,
        path_or_fileobj,
        path_in_repo: str,
        repo_id: str,
        commit_message: str | None = None,
        parent_commit: str | None = None,
        **_,
    ):
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=path_or_fileobj)
        return self.create_commit(
            repo_id,
            [op],
            commit_message=commit_message or f"Upload {path_in_repo}",
            parent_commit=parent_commit,
        )

    def super_squash_history(
        self, repo_id: str, *, branch: str | None = None, commit_message: str | None = None, **_
    ) -> None:
        url = f"{URL}/{repo_id}/super-squash/main"
        with self._commit("super_squash_history", repo_id, url) as (state, repo, _):
            head = repo["history"][-1]
            sha = _sha("squash", head["sha"])
            repo["history"] = [
                {"sha": sha, "message": commit_message or "Super-squash", "files": head["files"]}
            ]
            used = {b for r in state["repos"].values() for c in r["history"] for b, _ in c["files"].values()}
            for path in (self.folder / "blobs").iterdir():  # what no commit holds any more is freed
                if path.name not in used:
                    path.unlink()

    # ---- the Hub's rules -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, name: str, repo_id: str | None, must_exist: bool = True, **details):
        """One call: journaled, its planned fault raised, the token checked, the repo looked up (404 when
        missing, or private and someone else's). Yields the state (saved if the block succeeds), the repo
        and the planned fault's hold."""
        message = details.get("message") or ""
        with _locked(self.folder) as state:
            fault = None
            matches = {f.get("match", "") for f in state["faults"] if f["call"] == name} | {""}
            for match in [m for m in matches if m in message]:  # each counter the call advances
                key = _counter(name, match)
                state["counts"][key] = count = state["counts"].get(key, 0) + 1
                planned = [f for f in state["faults"] if f["call"] == name and f.get("match", "") == match]
                fault = fault or next((f for f in planned if f["at"] == count), None)
            state["calls"].append({"call": name, "repo": repo_id, "pid": os.getpid(), **details})
        if fault and fault["timeout"]:
            raise http.ReadTimeout("The read operation timed out", request=http.Request("GET", URL))
        if fault and fault["status"]:
            _refused(self.folder, name, fault["status"], message)
            _raise(fault["status"], "POST", f"{URL}/{repo_id}", MESSAGES.get(fault["status"], "Server error"))
        with _locked(self.folder) as state:
            user, _ = self._user(state, self.token)
            repo = None
            if repo_id is not None and must_exist:
                repo = state["repos"].get(repo_id)
                if repo is None or (repo["private"] and repo_id.split("/")[0] != user):
                    _raise(404, "GET", f"{URL}/{repo_id}", "Repository not found", "RepoNotFound")
            yield state, repo, fault or {}

    @contextlib.contextmanager
    def _commit(self, name: str, repo_id: str, url: str, message: str = ""):
        """A commit: write access, then the repo's commit lock for its duration (409 while another commit
        holds it; a lock left by a killed process is broken), the hourly budget (429), then the state,
        read and saved under the state lock; a planned `kill` ends the process once the commit is in."""
        with self._call(name, repo_id, message=message) as (state, repo, fault):
            user, can_write = self._user(state, self.token)
            if not can_write or repo_id.split("/")[0] != user:
                _raise(403, "POST", url, "You don't have the rights to write to this repo")
        lock = self.folder / "locks" / (repo_id.replace("/", "__") + ".lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock.read_text() if lock.exists() else ""
            if holder.isdigit() and not _alive(int(holder)):
                lock.unlink(missing_ok=True)
            _refused(self.folder, name, 409, message)
            _raise(409, "POST", url, MESSAGES[409])
        try:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            # a slow upload: the lock stays held, other processes' calls go on (with `overlap`, until one
            # of them has met it)
            busy, deadline = len(self._refusals(409)), time.time() + fault.get("hold", 0.0)
            while time.time() < deadline and not (fault.get("overlap") and len(self._refusals(409)) > busy):
                time.sleep(0.02)
            with _locked(self.folder) as state:
                repo = state["repos"][repo_id]
                hour = [t for t in repo["commit_times"] if t > time.time() - 3600]
                over = len(hour) >= state["budget"]
                if not over:
                    yield state, repo, fault
            if over:
                _refused(self.folder, name, 429, message)
                _raise(429, "POST", url, f"{MESSAGES[429]} ({state['budget']} per hour)")
        finally:
            lock.unlink(missing_ok=True)

    def _refusals(self, status: int) -> list[dict]:
        return [r for r in _read(self.folder / "state.json").get("refusals", []) if r["status"] == status]

    def _user(self, state: dict, token: str | None) -> tuple[str, bool]:
        if token not in state["tokens"]:
            _raise(
                401,
                "GET",
                "https://huggingface.co/api/whoami-v2",
                "Invalid credentials in Authorization header",
            )
        user, can_write = state["tokens"][token]
        return user, can_write

    def _blob(self, source) -> tuple[str, int]:
        if isinstance(source, (str, Path)):
            data = Path(source).read_bytes()
        elif isinstance(source, bytes):
            data = source
        else:
            data = source.read() if not isinstance(source, io.BytesIO) else source.getvalue()
        blob = hashlib.sha256(data).hexdigest()
        path = self.folder / "blobs" / blob
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return blob, len(data)


# ---- the state on disk ---------------------------------------------------------------------------------
def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, state: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(folder: Path):
    """The whole state, read and (unless the block raises) written back under an exclusive file lock."""
    with open(folder / "state.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = _read(folder / "state.json")
            yield state
            _write(folder / "state.json", state)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _used(folder: Path, repo: dict) -> int:
    """Bytes of every blob any commit of the repo's history holds (deleted files count until a squash)."""
    blobs = {blob: n for commit in repo["history"] for blob, n in commit["files"].values()}
    return sum(blobs.values())


def _counter(call: str, match: str) -> str:
    """What a planned fault is numbered by: every call of `call`, or those whose message holds `match`."""
    return f"{call}~{match}" if match else call


def _refused(folder: Path, call: str, status: int, message: str) -> None:
    with _locked(folder) as state:
        state.setdefault("refusals", []).append(
            {"call": call, "status": status, "message": message, "pid": os.getpid()}
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _sha(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


def _raise(status: int, method: str, url: str, message: str, code: str | None = None):
    """Raise what huggingface_hub raises for this answer of the Hub."""
    headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
    response = http.Response(status, headers=headers, request=http.Request(method, url))
    hf_raise_for_status(response)
    raise AssertionError(f"hf_raise_for_status did not raise for {status}")
