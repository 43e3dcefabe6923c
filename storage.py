"""The checkpoint store: where the series keeps what must outlive a session (a private Hub model repo, or a
folder such as a mounted Google Drive), what goes there and when, and where a notebook finds what an
earlier notebook made (the store, or on Kaggle an earlier notebook's output added as input).

On Kaggle and Colab each notebook runs in its own session, so the store is what joins them. What goes
there is what is expensive to recompute: the reward model, each run's final state, each merge, the final
policies. A progress checkpoint (policy, anchor and Adam: about 2 GB for GPT-2) stays on the local disk
unless its run has gone `progress_minutes` without a stored state; then only its latest is stored,
replacing the one before. Each push is one commit; each stage squashes the Hub repo's history at its end,
so that deleted files stop counting against the account's storage. Where the bytes go (a folder, or a Hub
repo whose passing failures are retried) is `store_backends.py`; a push that still fails is remembered and
carried by the next one, in whichever process of the session makes it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import time
import warnings
from pathlib import Path

import store_backends
from checkpoints import looks_local, previous, remove
from store_backends import Backoff, FolderBackend, HubBackend, describe, files_of, no_answer, status

REPO_NAME = "warp-imdb"  # the store's default name: <the token's user>/warp-imdb
PROGRESS_MINUTES = 60.0  # a run pushes a progress checkpoint only after this long without a stored state
KAGGLE_INPUT = Path("/kaggle/input")  # where Kaggle mounts the inputs added to a notebook
DRIVE = Path("/content/drive")  # where Colab mounts Google Drive
LOG = ".store-log.jsonl"  # under the local checkpoints root: the session's commits and failed pushes
KINDS = ("commit", "check", "squash")  # the log's entries that are commits to the store
LEDGER = store_backends.LEDGER  # a folder store's record of its commits
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def hf_token() -> str | None:
    """A Hub token from a Kaggle or Colab secret `HF_TOKEN`, else the HF_TOKEN environment variable. A
    secret's token is also put in the environment as HF_TOKEN, so that the models' downloads use it too
    (else they go anonymous: gated models refused, lower rate limits)."""
    token = None
    try:
        from kaggle_secrets import UserSecretsClient  # only exists on Kaggle

        token = UserSecretsClient().get_secret("HF_TOKEN")
    except Exception:
        try:
            from google.colab import userdata  # only exists on Colab

            token = userdata.get("HF_TOKEN")
        except Exception:
            pass
    if token:
        os.environ["HF_TOKEN"] = token
    return token or os.environ.get("HF_TOKEN") or None


def _hub_user(token: str) -> str:
    """The user name of a Hub token."""
    from huggingface_hub import whoami

    return whoami(token=token)["name"]


def resolve_store(value: str, token: str | None, where: str) -> tuple[str, str]:
    """The store a notebook uses, checked before any work, and one line that says what it is.

    `value` is the notebook's STORE: a Hub repo id `owner/name` (a pasted https://huggingface.co/... URL
    or a trailing slash is normalised), an absolute folder, or "" for the default. `where` is the platform
    ('kaggle', 'colab', 'local'). On Kaggle and Colab, where each notebook is a session of its own, ""
    means the private repo `<the token's user>/warp-imdb`; with no token, Colab needs a Drive folder, and
    Kaggle goes on without a store (the next notebook gets this one's output added as input). Anything
    else that is not owner/name or an absolute folder is refused with the fix.
    """
    value = value.strip()
    if not value:
        if where in ("kaggle", "colab") and token:
            try:
                user = _hub_user(token)
            except Exception as e:
                raise ValueError(
                    f"STORE is empty and the HF_TOKEN's user could not be read ({describe(e)}): "
                    f"set STORE = '<your user>/{REPO_NAME}'"
                ) from e
            repo = f"{user}/{REPO_NAME}"
            return repo, f"store: {repo} (private Hub repo of the HF_TOKEN's user; set STORE to change it)"
        if where == "colab":
            raise ValueError(
                "STORE is empty and there is no HF_TOKEN: on Colab each notebook runs in its own session, "
                "so its results need a store. Mount Google Drive (from google.colab import drive; "
                f"drive.mount('{DRIVE}')) and set STORE = '{DRIVE}/MyDrive/{REPO_NAME}-checkpoints', or add "
                "an HF_TOKEN secret (key icon -> Secrets, a write token, notebook access on)"
            )
        if where == "kaggle":
            return "", (
                "store: none (no HF_TOKEN): results stay in this session. To use them in the next notebook, "
                "run this one with Save Version -> Save & Run All and add its output as input there (Add "
                "Input -> Your Work); or add an HF_TOKEN secret (Add-ons -> Secrets) to store them on the Hub"
            )
        return "", "store: none; checkpoints stay on this machine's disk"
    url = re.match(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(.*)$", value)
    if url:
        parts = [p for p in url.group(1).split("/") if p]
        if parts and parts[0] in ("datasets", "spaces"):
            raise ValueError(f"STORE={value!r} is a {parts[0][:-1]}; the store is a model repo: 'owner/name'")
        if len(parts) < 2:
            raise ValueError(f"STORE={value!r}: the URL names no repo; give 'owner/name'")
        fixed = "/".join(parts[:2])
        return _checked_repo(fixed, token, f"store: {fixed} (from the URL {value!r})")
    if value.startswith(("/", "~")):
        return _checked_folder(str(Path(value).expanduser()), where)
    value = value.rstrip("/")  # "owner/name/" is a repo id with a slash too many
    # a bare name is a repo name without its owner, even where a folder of that name (a clone) exists
    if value.startswith(".") or value.count("/") > 1 or (value.count("/") == 1 and Path(value).exists()):
        raise ValueError(
            f"STORE={value!r} is a relative folder, which stays inside this session's working folder: give "
            f"an absolute folder that outlives the session (Colab, with Drive mounted: "
            f"'{DRIVE}/MyDrive/{REPO_NAME}-checkpoints') or a Hub repo 'owner/name'"
        )
    if value.count("/") == 0:
        try:
            hint = f"'{_hub_user(token)}/{value}'" if token else f"'<your user>/{value}'"
        except Exception:
            hint = f"'<your user>/{value}'"
        folder = " (a folder store is given by its absolute path)" if Path(value).exists() else ""
        raise ValueError(f"STORE={value!r} is not a Hub repo id (owner/name): did you mean {hint}?{folder}")
    return _checked_repo(value, token, f"store: {value} (private Hub repo)")


def _checked_repo(repo: str, token: str | None, line: str) -> tuple[str, str]:
    owner, _, name = repo.partition("/")
    if not (_REPO_PART.match(owner) and _REPO_PART.match(name)):
        raise ValueError(f"STORE={repo!r}: a Hub repo id is 'owner/name' in letters, digits, '-', '_', '.'")
    if not token:
        raise ValueError(
            f"STORE={repo!r} is a Hub repo, and there is no HF_TOKEN to write to it: add one "
            "(Kaggle: Add-ons -> Secrets; Colab: key icon -> Secrets), or give a folder that outlives "
            "the session"
        )
    return repo, line


def _checked_folder(folder: str, where: str) -> tuple[str, str]:
    path = Path(folder)
    on_drive = path == DRIVE or DRIVE in path.parents
    if on_drive and not (DRIVE / "MyDrive").exists():
        raise ValueError(
            f"STORE={folder!r} is on Google Drive, which is not mounted: run "
            f"from google.colab import drive; drive.mount('{DRIVE}') first"
        )
    if where == "colab" and not on_drive:
        return (
            folder,
            f"store: {folder} (on this Colab session's disk: LOST when the session ends; use Drive)",
        )
    if where == "kaggle":
        kept = Path("/kaggle/working") in (path, *path.parents)
        return folder, (
            f"store: {folder} (kept as this notebook's output only when it is saved with Save Version)"
            if kept
            else f"store: {folder} (outside /kaggle/working: LOST when the session ends)"
        )
    return folder, f"store: {folder} (a folder; it outlives the session)" + (" (Google Drive)" * on_drive)


def missing_hint(notebook: str, what: str) -> str:
    """What to do when an earlier notebook's output (e.g. 01's reward model) is not found."""
    return (
        f"{what} is made by {notebook}: run it first with the same STORE (on Kaggle and Colab each notebook "
        f"runs in its own session, so it reaches this one only through the store), or on Kaggle add "
        f"{notebook}'s output as input (Add Input -> Your Work)"
    )


def no_store_hint(where: str) -> str:
    """What to do to keep a notebook's results when it ran without a store."""
    if where == "kaggle":
        return (
            "To use it in the next notebook: Save Version -> Save & Run All, then add this notebook's output "
            "as input there (Add Input -> Your Work); or add an HF_TOKEN secret and rerun to store it"
        )
    return (
        "To keep it beyond this session, set STORE to a Hub repo 'owner/name' (with an HF_TOKEN) or a folder "
        "that outlives the session and rerun: it loads instead of retraining, and is stored"
    )


def earlier_outputs(root: Path | None = None, below: int = 2, max_entries: int = 1000) -> list[Path]:
    """Folders under Kaggle's inputs (`root`, default KAGGLE_INPUT) where an earlier notebook's checkpoints
    may be: each added input and the folders up to `below` levels inside it, the shallowest first.

    Kaggle mounts an input at `datasets/<owner>/<slug>` or `notebooks/<owner>/<slug>` (older: `<slug>`).
    A notebook's output holds its working folder, the checkpoints one level in (or two, under a clone);
    an uploaded zip adds a folder. The search is bounded: hidden folders are skipped, and a folder of more
    than `max_entries` entries (a data set's files, not an output) is not looked into.
    """

    def folders_in(folder: Path) -> list[Path]:
        entries = []
        try:
            with os.scandir(folder) as listing:
                for entry in listing:  # read no more of a large folder than needed to tell it is large
                    entries.append(entry)
                    if len(entries) > max_entries:
                        return []
        except OSError:
            return []
        return sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir())

    root = root or KAGGLE_INPUT
    groups = ("datasets", "notebooks")  # Kaggle's layout: <group>/<owner>/<slug>
    level = [slug for group in groups for owner in folders_in(root / group) for slug in folders_in(owner)]
    level += [p for p in folders_in(root) if p.name not in groups]
    found = list(level)
    for _ in range(below):
        level = [p for folder in level for p in folders_in(folder)]
        found += level
    return found


class SessionLog:
    """What the store was sent, in a file under the local checkpoints root (`LOG`) that every process of a
    session appends to (a notebook, and the training processes it spawns, which inherit its session id
    with the pickled Store): each commit, and each push that failed, with what it left unstored. So
    `Store.log` counts the children's commits too, and the next push, in whichever process, carries what
    an earlier one could not store (also in a later session on the same disk)."""

    def __init__(self, root: Path, location: str):
        self.path, self.location = root / LOG, location

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one short write per line: appends of processes do not mix
            f.write(json.dumps({"store": self.location, **entry}) + "\n")

    def entries(self) -> list[dict]:
        """This store's entries, oldest first (a line cut short by a killed process is skipped)."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [e for e in entries if e.get("store") == self.location]

    def unstored(self) -> tuple[list[str], dict[str, float]]:
        """The places (relative to the root) that failed pushes left to push, and to delete (each with
        the time of the last push that failed to), that no later commit settled."""
        push, delete = {}, {}
        for e in self.entries():
            if e["kind"] == "failed":
                push.update(dict.fromkeys(e["paths"]))
                delete.update(dict.fromkeys(e["delete"], e["time"]))
            for rel in e.get("settled", []):
                for waiting in (push, delete):
                    for r in [r for r in waiting if r == rel or r.startswith(rel + "/")]:
                        del waiting[r]
        return list(push), delete


class Store:
    """Where the series keeps what must outlive a session: a Hub model repo (created private) or a local
    folder (a mounted Google Drive, a persisted Kaggle folder). Empty = no store.

    It mirrors the local checkpoints tree under `root`: `push(*paths)` copies files or folders under `root`
    to the same relative places in the store in one commit, `pull(path)` copies one back when it is missing
    locally, file by file (never the whole store), so each stage keeps to its own folder and a new session
    fetches only what its next step needs. `inputs` are read-only folders that `pull` also looks in (on
    Kaggle: earlier notebooks' outputs added as input). Local copies are atomic, like every other write
    here. Where the bytes go is its `backend` (`store_backends`). A push that fails is remembered (`unstored`)
    and carried by the next one; `holds` asks the store itself. `log` lists this session's commits (files
    and bytes, its spawned processes' too), `summary` says it in one line.
    """

    def __init__(self, location: str, root: str | Path, token: str | None = None,
                 progress_minutes: float = PROGRESS_MINUTES, inputs: list[Path] | None = None,
                 backoff: Backoff | None = None):  # fmt: skip
        self.location, self.root, self.token = location, Path(root), token
        self.progress_minutes, self.inputs = progress_minutes, list(inputs or [])
        self._later: list[Path] = []  # small records that ride along with the next commit (`later`)
        # tells this session's commits in the logs; a spawned process inherits it with the pickled Store
        self.session = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        self._log = SessionLog(self.root, location)
        self.backend = None
        if location and looks_local(location):
            self.backend = FolderBackend(location)
        elif location:
            if not token:
                _checked_repo(location, token, "")  # raises: a Hub repo needs a token
            self.backend = HubBackend(location, token, backoff)

    def __getstate__(self) -> dict:
        """A spawned training process's copy: the records waiting for a commit stay the parent's to push
        (else each child's first commit uploads them again)."""
        return {**self.__dict__, "_later": []}

    def __bool__(self) -> bool:
        return bool(self.location)

    def __repr__(self) -> str:  # never shows the token
        return f"Store({self.location or 'none'!r}, root={str(self.root)!r})"

    def _rel(self, path: str | Path) -> str | None:
        """`path` relative to `root`; None for a path outside it (e.g. a Hub id given as a model)."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None

    @property
    def log(self) -> list[dict]:
        """This session's commits (the write check and the squash count as commits), in every process."""
        return [e for e in self._log.entries() if e["session"] == self.session and e["kind"] in KINDS]

    def unstored(self) -> list[Path]:
        """What pushes of this or an earlier session could not store and the next push will carry."""
        return [self.root / rel for rel in self._log.unstored()[0]] if self else []

    def _record(self, kind: str, added=(), deleted=(), **more) -> None:
        """One commit in the session log, and in the store's own record (a folder's ledger)."""
        entry = {"session": self.session, "time": time.time(), "kind": kind, "added": [f for f, _ in added]}
        entry.update(bytes=sum(n for _, n in added), sizes=[n for _, n in added], deleted=list(deleted))
        self._log.append({**entry, **more})
        if kind in KINDS:
            self.backend.record(entry)

    def check_writable(self) -> str:
        """Make sure the store can be written, before any work: create the private repo and make one small
        commit (or write a file into the folder). Raises PermissionError (a refused token: it must be a
        write token) or ConnectionError (the Hub did not answer: retry later) with the fix; returns a line."""
        if not self:
            return "store: none"
        try:
            added = self.backend.check()
        except (PermissionError, ConnectionError) as e:
            raise type(e)(f"STORE={self.location!r}: {e}") from e
        self._record("check", added)
        return f"store: {self.location} is writable{self.backend.what}"

    def later(self, *paths: str | Path) -> None:
        """Store small records (a config, a timing) with the next commit instead of one of their own: the
        Hub counts commits, and a record matters only beside the results it describes."""
        self._later += [Path(p) for p in paths if Path(p) not in self._later]

    def push(self, *paths: str | Path, delete=()) -> bool:
        """Copy files or folders (under `root`) into the store and remove `delete` from it, all in one
        commit with the records waiting for one (`later`) and what earlier pushes left unstored (a folder
        replaces the store's copy whole; on the Hub the commit is atomic, so what is deleted goes only with
        what replaces it, and what to delete is listed just before). True only when there is a store and
        every path that exists reached it; a failure warns, naming what is not stored (the local copies
        are intact, and the next push carries them), so a caller says "stored" only on True."""
        if not self:
            return False
        outside = [p for p in map(Path, paths) if self._rel(p) is None]
        for path in outside:
            warnings.warn(f"{path} is outside {self.root}: not pushed to the store", stacklevel=2)
        waiting, waiting_delete = self._log.unstored()
        asked = [self._rel(p) for p in [*paths, *self._later]]
        rels = list(dict.fromkeys([r for r in asked if r is not None] + waiting))
        deletes = list(
            dict.fromkeys([r for r in map(self._rel, [p for p in delete if p]) if r] + list(waiting_delete))
        )
        # what this commit deletes is not uploaded by it: a run's final left by a failed push and carried
        # here by the merge's commit, which discards it, would stay in the store for good (0.5 GB for GPT-2)
        rels = [r for r in rels if not any(r == d or r.startswith(d + "/") for d in deletes)]
        items = [(self.root / rel, rel) for rel in rels if (self.root / rel).exists()]
        if not items and not deletes:
            return not outside
        names = [rel for _, rel in items] or [f"delete {d}" for d in deletes]
        message = "store " + ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        try:
            gone, replaced = self.backend.commit(items, deletes, message)
        except Exception as e:
            self._record("failed", paths=rels, delete=deletes, error=describe(e))
            asked = ", ".join(map(str, paths)) or ", ".join(rels) or "the deletion of " + ", ".join(deletes)
            left = ", ".join(rels) or "nothing new"
            left += f"; not deleted from it: {', '.join(deletes)}" if deletes else ""
            warnings.warn(
                f"could not push {asked} to {self.location} ({describe(e)}). Not stored: {left}. The local "
                "copies stay, and the next push carries them (or rerun this cell)",
                stacklevel=2,
            )
            return False
        added = [(rel, f.stat().st_size) for f, rel in files_of(items)]
        self._record(
            "commit" if added or gone else "settled", added, gone, settled=rels + deletes, replaced=replaced
        )
        self._later = []
        self._discard(waiting_delete, rels)
        return not outside

    def _discard(self, carried: dict[str, float], pushed: list[str]) -> None:
        """Delete here what a failed push was to delete from the store, now that a later commit deleted it
        there: every caller of a push with `delete` (a run's progress, the states a merge made useless)
        deletes the same places here once the store confirms, which a failed push left undone. A progress
        checkpoint goes with the one before it (`checkpoints.previous`). What this commit pushed, or what
        was written since that push failed (a place made again), stays."""
        for rel, failed_at in carried.items():
            if any(r == rel or r.startswith(rel + "/") or rel.startswith(r + "/") for r in pushed):
                continue
            for path in (self.root / rel, previous(self.root / rel)):
                files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
                if path.exists() and all(f.stat().st_mtime <= failed_at for f in files):
                    remove(path)

    def push_progress(self, path: str | Path, since: float, *also: str | Path) -> bool:
        """Push a run's progress checkpoint (with `also`, what a resume from it needs, e.g. the snapshots
        before it) only when more than `progress_minutes` have passed since `since` (the `time.time()` of
        the run's last stored state, or of its start in this session); it replaces the one before at the
        same place. True when pushed (the caller's new `since`)."""
        if not self or (time.time() - since) / 60 < self.progress_minutes:
            return False
        return self.push(path, *also)

    def holds(self, path: str | Path) -> bool:
        """True when the store has `path` (a local path under `root`), asked now: a file, or a folder with
        files."""
        rel = self._rel(path)
        return bool(self) and rel is not None and bool(self.backend.held([rel], fresh=True))

    def release(self, *paths: str | Path) -> None:
        """Free local disk: delete the local copy of each path the store holds (GPT-2 states are 0.5 GB
        each); a later `pull` brings it back. Without a store nothing is deleted: the local copy is the
        only one."""
        for path in map(Path, paths):
            if path.exists() and self.holds(path):
                remove(path)

    def delete(self, *paths: str | Path) -> None:
        """Remove files or folders (local paths under `root`) from the store in one commit, e.g. a run's
        progress once its result is stored; what the store does not hold is skipped."""
        self.push(delete=paths)

    def squash(self) -> None:
        """At a notebook's end: commit the records still waiting (`later`, and what is unstored), then, on
        the Hub, if this session deleted or replaced files, squash the repo's history into one commit, so
        that they (GBs) stop counting against the account's storage; a folder keeps no history. A failure
        only warns."""
        if not self:
            return
        if self._later or any(self._log.unstored()):  # the records waiting for a commit go first
            self.push()
        since = list(itertools.takewhile(lambda e: e["kind"] != "squash", reversed(self.log)))
        if not any(e.get("replaced") for e in since):  # the history holds nothing to free
            return
        try:
            self.backend.squash()
            self._record("squash")  # a folder: in the ledger, the Hub's commit it stands for
        except Exception as e:
            warnings.warn(f"could not squash the history of {self.location} ({describe(e)})", stacklevel=2)

    def size(self) -> int:
        """Bytes the store holds now."""
        return self.backend.size() if self else 0

    def summary(self) -> str:
        """One line: what this session committed to the store, and how much the store holds."""
        if not self:
            return "store: none; nothing was stored"
        log = self.log
        commits, sent = len(log), sum(e["bytes"] for e in log)
        try:
            held = f"; it holds {self.size() / 1e9:.2f} GB"
        except Exception as e:  # the size is information, not a reason to fail a finished notebook
            held = f"; its size could not be read ({type(e).__name__})"
        unstored = self.unstored()
        left = f"; NOT stored yet: {', '.join(self._rel(p) for p in unstored)}" if unstored else ""
        sent = f"{commits} commit(s) this session, {sent / 1e9:.2f} GB uploaded"
        return f"store {self.location}: {sent}{held}{left}"

    def _sources(self) -> list:
        return ([self.backend] if self else []) + [FolderBackend(p) for p in self.inputs]

    def pull(self, *paths: str | Path) -> None:
        """Copy files or folders (local paths under `root`) from the store, or from an input, where they are
        missing locally; what neither holds is skipped. A missing folder appears whole or not at all; into
        a folder that exists, the entries it lacks are pulled the same way (e.g. the REINFORCE snapshots
        that were released to free disk). The store's listing is the one made at this process's last
        commit (other processes' files are on this disk). When the store cannot be read, raises
        ConnectionError: resuming as if it were empty would retrain and then overwrite its newer states."""
        for local in map(Path, paths):
            rel = self._rel(local)
            if rel is None or (local.exists() and not local.is_dir()):
                continue
            try:
                if local.is_dir():
                    names = set().union(*(source.children(rel) for source in self._sources()))
                else:
                    any(source.fetch(rel, local) for source in self._sources())  # the first that has it
                    continue
            except Exception as e:
                if status(e) is None and not no_answer(e):  # not the Hub's answer: a local fault
                    raise
                raise ConnectionError(f"could not read {rel} from {self.location}: {describe(e)}") from e
            self.pull(*(local / name for name in sorted(names) if not name.startswith(".")))


def open_store(value: str, root: str | Path, token: str | None, where: str,
               progress_minutes: float = PROGRESS_MINUTES) -> Store:  # fmt: skip
    """The notebooks' store, from their STORE parameter: resolved and checked (`resolve_store`), its write
    access checked once, before any work, and on Kaggle the earlier notebooks' outputs added as inputs;
    prints what it is."""
    location, line = resolve_store(value, token, where)
    print(line)
    inputs = []
    if where == "kaggle":
        inputs = [p for p in earlier_outputs() if p.name == Path(root).name or (p / "reward_model").is_dir()]
        for p in inputs:
            print(f"earlier output found: {p}")
    store = Store(location, root, token, progress_minutes=progress_minutes, inputs=inputs)
    if store:
        print(store.check_writable())
    return store
