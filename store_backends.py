"""Where the checkpoint store's bytes go: a folder (`FolderBackend`) or a Hub model repo (`HubBackend`),
behind one set of methods that `storage.Store` calls (held, children, fetch, commit, squash, size, check,
record), so that a stand-in of the Hub can replace the real one in tests.

Both mirror the local checkpoints tree: a path `rel` (relative to the checkpoints root) is a file or a
folder of files at the same place in the store. The Hub's calls are retried on what passes with time (409
another commit is in progress, 412 the repo moved on since it was listed, 429 the rate limit, 5xx, no
answer) with exponential backoff and jitter, a few times, the total wait bounded; what still fails raises,
and `describe` says what it was and what to do.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from checkpoints import _atomic_file, atomic_dir, folder_bytes, remove

LEDGER = ".ledger.jsonl"  # a folder store's record of its commits (hidden: never pulled)
PASSING = (408, 409, 412, 423, 429)  # request timeout, commit in progress, repo moved on, locked, rate limit


def status(error: BaseException) -> int | None:
    """The HTTP status of a failed Hub call (HfHubHTTPError and its subclasses carry the response)."""
    return getattr(getattr(error, "response", None), "status_code", None)


def no_answer(error: BaseException) -> bool:
    """The Hub did not answer: a timeout or a failed connection (the HTTP library's, or Python's own)."""
    from huggingface_hub.errors import HTTPError  # the HTTP library's base class

    return status(error) is None and isinstance(error, (TimeoutError, ConnectionError, HTTPError))


def passing(error: BaseException) -> bool:
    """Whether a failed Hub call may succeed when retried: the Hub was busy, overloaded or out of reach."""
    code = status(error)
    return code in PASSING or code >= 500 if code is not None else no_answer(error)


def describe(error: BaseException) -> str:
    """A failed store call in words: what it was and what to do (status-aware)."""
    code, first = status(error), (str(error).strip().splitlines() or [""])[0]
    said = f"{type(error).__name__}: {first}" if first else type(error).__name__
    if code in (401, 403):
        meaning = (
            f"the Hub refused the HF_TOKEN ({code}): it must be a write token (huggingface.co/settings/"
            "tokens) and the repo yours or your organisation's"
        )
    elif code == 404:
        meaning = "the repo or file is not there (404): check STORE's owner/name"
    elif code in (409, 412, 423):
        meaning = f"the repo was busy with other commits ({code}) through every retry; retry later"
    elif code == 429:
        meaning = (
            "the Hub's rate limit (429: too many commits or requests in the last hour); wait, or push "
            "progress less often (a larger store_progress_minutes)"
        )
    elif (code is not None and code >= 500) or no_answer(error):
        meaning = "the Hub did not answer (an outage or the network); retry later"
    else:
        return said
    return f"{said}; {meaning}"


@dataclass
class Backoff:
    """How a Hub call is retried when it fails in a way that passes: `tries` in all, waits doubling from
    `first` seconds, each drawn from [w/2, w] (jitter, so that processes that collided do not collide
    again), at most `total` seconds of waiting in all; `sleep` is time.sleep except in tests."""

    tries: int = 5
    first: float = 2.0
    total: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def run(self, call: Callable, *args, **kwargs):
        waited = 0.0
        for attempt in range(self.tries):
            try:
                return call(*args, **kwargs)
            except Exception as e:
                wait = self.first * 2**attempt * random.uniform(0.5, 1.0)
                if not passing(e) or attempt + 1 == self.tries or waited + wait > self.total:
                    raise
            self.sleep(wait)
            waited += wait


BACKOFF = Backoff()  # what a HubBackend made without one retries with (tests make it fast)


def files_of(items: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """The files of (local path, rel) items, each with its place in the store (a folder's, sorted)."""
    return [
        (f, f"{rel}/{f.relative_to(path).as_posix()}" if path.is_dir() else rel)
        for path, rel in items
        for f in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    ]


def _under(files, rels: list[str]) -> list[str]:
    return sorted(f for f in files if any(f == r or f.startswith(r + "/") for r in rels))


class FolderBackend:
    """A folder: a mounted Google Drive, a persisted Kaggle folder; or, read only, an earlier notebook's
    output added as input on Kaggle. A folder keeps no history; its ledger (`LEDGER`) records the commits a
    Hub repo would get (`bench/store_budget.py` counts them)."""

    what = ""  # for "store: ... is writable"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def held(self, rels: list[str], fresh: bool = False) -> list[str]:
        """The entries (files or folders) among `rels` the folder has."""
        return [r for r in rels if (self.folder / r).exists()]

    def children(self, rel: str) -> set[str]:
        folder = self.folder / rel
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def fetch(self, rel: str, local: Path) -> bool:
        """Copy `rel` to `local` (a folder whole, atomically); False when the folder lacks it."""
        src = self.folder / rel
        if src.is_dir():
            with atomic_dir(local) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
        elif src.exists():
            with _atomic_file(local, "wb") as f, open(src, "rb") as s:
                shutil.copyfileobj(s, f)
        return src.exists()

    def commit(
        self, items: list[tuple[Path, str]], deletes: list[str], message: str
    ) -> tuple[list[str], bool]:
        """Copy each (local path, rel) item to its place (a folder replaces the copy there whole), then
        remove the entries `deletes`. Returns (the entries removed, whether anything was replaced)."""
        gone = self.held(deletes)
        replaced = bool(gone) or bool(self.held([rel for _, rel in items]))
        for path, rel in items:
            if path.is_dir():
                with atomic_dir(self.folder / rel) as tmp:
                    shutil.copytree(path, tmp, dirs_exist_ok=True)
            else:
                with _atomic_file(self.folder / rel, "wb") as out, open(path, "rb") as src:
                    shutil.copyfileobj(src, out)
        for rel in gone:
            remove(self.folder / rel)
        return gone, replaced

    def squash(self) -> None:
        """Nothing to free: a folder keeps no history."""

    def size(self) -> int:
        return folder_bytes(self.folder)

    def check(self) -> list[tuple[str, int]]:
        """Create the folder and write a file into it; PermissionError with the fix if that fails."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".write-check."):
                pass
        except OSError as e:
            raise PermissionError(f"cannot write there ({e}); choose another") from e
        return []

    def record(self, entry: dict) -> None:
        """Append one commit to the folder's ledger."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LEDGER, "a") as f:
            f.write(json.dumps(entry) + "\n")


class HubBackend:
    """A Hub model repo, created private by the first write of a session (the write check, or the first
    commit). Its listing is kept until this process's next commit (which updates it), except where a stale
    one would do harm: deletions, `holds`, the size are listed afresh. A pickled copy (a spawned training
    process) makes its own client and lists afresh."""

    what = " (private Hub repo)"

    def __init__(self, repo: str, token: str | None, backoff: Backoff | None = None):
        from huggingface_hub import HfApi

        self.repo, self.token, self.backoff = repo, token, backoff or BACKOFF
        self._new_api = HfApi  # looked up now, so that a stand-in installed by a test reaches child processes
        self._api = None
        self._sha, self._files = None, None  # the head and {file: bytes} as last listed; None: not yet
        self._created = False  # whether this session made sure that the repo exists

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_api": None, "_sha": None, "_files": None}

    def _client(self):
        if self._api is None:
            self._api = self._new_api(token=self.token)
        return self._api

    def _call(self, name: str, *args, **kwargs):
        """One call of the Hub's client, retried (`backoff`)."""
        return self.backoff.run(lambda: getattr(self._client(), name)(*args, **kwargs))

    def _list(self, retried: bool = True) -> dict[str, int]:
        """List the repo now; empty when it does not exist yet."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            kwargs = {"files_metadata": True}
            info = (
                self._call("repo_info", self.repo, **kwargs)
                if retried
                else self._client().repo_info(self.repo, **kwargs)
            )
            self._sha, self._files = info.sha, {s.rfilename: s.size or 0 for s in info.siblings or []}
        except RepositoryNotFoundError:
            self._sha, self._files = None, {}
        return self._files

    def listing(self, fresh: bool = False) -> dict[str, int]:
        return self._list() if fresh or self._files is None else self._files

    def held(self, rels: list[str], fresh: bool = False) -> list[str]:
        """The repo's files under `rels`."""
        return _under(self.listing(fresh), rels)

    def children(self, rel: str) -> set[str]:
        return {f[len(rel) + 1 :].split("/")[0] for f in self.held([rel]) if f != rel}

    def fetch(self, rel: str, local: Path, fresh: bool = False) -> bool:
        """Download the files under `rel` into a temporary folder beside `local`, then move them into place
        at once; False when the repo holds none. A file gone since the listing (another process deleted it)
        lists the repo again."""
        from huggingface_hub.errors import EntryNotFoundError

        files = self.held([rel], fresh)
        if not files:
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}."))
        try:
            for f in files:  # each with its own progress bar
                self._call("hf_hub_download", self.repo, f, local_dir=str(tmp))
            os.replace(tmp / rel, local)
        except EntryNotFoundError:
            if fresh:
                raise
            return self.fetch(rel, local, fresh=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def commit(
        self, items: list[tuple[Path, str]], deletes: list[str], message: str
    ) -> tuple[list[str], bool]:
        """One commit: the files of `items` added, every file under `deletes` deleted. With deletions the
        repo is listed just before, and the commit names that listing's head as its parent, so that a
        commit another process made meanwhile is not overlooked (412: listed again, retried). Returns
        (the files deleted, whether anything was replaced or deleted)."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        files = files_of(items)
        try:
            replaced = bool(_under(self.listing(), [rel for _, rel in items]))
        except Exception:  # only bookkeeping (whether a squash would free anything): assume it would
            replaced = True

        def attempt() -> list[str]:
            gone = _under(self._list(retried=False), deletes) if deletes else []  # retried as a whole
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)) for f, rel in files]
            ops += [CommitOperationDelete(path_in_repo=f) for f in gone]
            if ops:
                self._client().create_commit(
                    self.repo,
                    operations=ops,
                    commit_message=message,
                    parent_commit=self._sha if gone else None,
                )
            return gone

        self._ensure_repo()
        gone = self.backoff.run(attempt)
        if self._files is not None:  # this process's own commit, in its listing
            self._files = {f: n for f, n in self._files.items() if f not in gone}
            self._files.update({rel: f.stat().st_size for f, rel in files})
            self._sha = None  # unknown until listed again
        return gone, replaced or bool(gone)

    def _ensure_repo(self) -> None:
        if not self._created:
            self._call("create_repo", self.repo, exist_ok=True, private=True)
            self._created = True

    def squash(self) -> None:
        """Squash the repo's history into one commit, so that replaced and deleted files stop counting."""
        self._call("super_squash_history", self.repo)
        self._sha = None

    def size(self) -> int:
        return sum(self.listing(fresh=True).values())

    def check(self) -> list[tuple[str, int]]:
        """Create the private repo and make one small commit; raises PermissionError (a refused token or
        another refusal) or ConnectionError (the Hub did not answer, or stayed busy), saying which."""
        note = f"written by the warp-imdb notebooks; last write check {time.strftime('%Y-%m-%d %H:%M')}\n"
        try:
            self._created = False
            self._ensure_repo()
            self._call(
                "upload_file", path_or_fileobj=note.encode(), path_in_repo=".warp-store", repo_id=self.repo,
                commit_message="warp-imdb: write check",
            )  # fmt: skip
        except Exception as e:
            if passing(e):
                raise ConnectionError(f"the write check failed ({describe(e)})") from e
            raise PermissionError(f"cannot create or write the Hub repo ({describe(e)})") from e
        self._files = None  # listed again when needed
        return [(".warp-store", len(note))]

    def record(self, entry: dict) -> None:
        """Nothing: the repo's history is its record."""
