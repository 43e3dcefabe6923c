"""The checkpoint store: where the series keeps what must outlive a session (a private Hub model repo, or a
folder such as a mounted Google Drive), what goes there and when, and where a notebook finds what an
earlier notebook made (the store, or on Kaggle an earlier notebook's output added as input).

On Kaggle and Colab each notebook runs in its own session, so the store is what joins them. What goes
there is what is expensive to recompute: the reward model, each run's final state, each merge, the final
policies. A progress checkpoint (policy, anchor and Adam: about 2 GB for GPT-2) stays on the local disk
unless its run has gone `progress_minutes` without a stored state; then only its latest is stored,
replacing the one before. Each push is one commit; each stage squashes the Hub repo's history at its end,
so that deleted files stop counting against the account's storage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from checkpoints import _atomic_file, atomic_dir, folder_bytes, looks_local, remove

REPO_NAME = "warp-imdb"  # the store's default name: <the token's user>/warp-imdb
PROGRESS_MINUTES = 60.0  # a run pushes a progress checkpoint only after this long without a stored state
KAGGLE_INPUT = Path("/kaggle/input")  # where Kaggle mounts the inputs added to a notebook
DRIVE = Path("/content/drive")  # where Colab mounts Google Drive
LEDGER = ".ledger.jsonl"  # a folder store's record of its commits (hidden: never pulled)
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def hf_token() -> str | None:
    """A Hub token from a Kaggle or Colab secret `HF_TOKEN`, else the HF_TOKEN environment variable."""
    try:
        from kaggle_secrets import UserSecretsClient  # only exists on Kaggle

        return UserSecretsClient().get_secret("HF_TOKEN")
    except Exception:
        pass
    try:
        from google.colab import userdata  # only exists on Colab

        return userdata.get("HF_TOKEN")
    except Exception:
        return os.environ.get("HF_TOKEN") or None


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
                    f"STORE is empty and the HF_TOKEN's user could not be read ({type(e).__name__}): "
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
    if value.startswith(".") or value.count("/") > 1 or Path(value).exists():
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
        raise ValueError(f"STORE={value!r} is not a Hub repo id (owner/name): did you mean {hint}?")
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


class Store:
    """Where the series keeps what must outlive a session: a Hub model repo (created private) or a local
    folder (a mounted Google Drive, a persisted Kaggle folder). Empty = no store.

    It mirrors the local checkpoints tree under `root`: `push(*paths)` copies files or folders under `root`
    to the same relative places in the store in one commit, `pull(path)` copies one back when it is missing
    locally, file by file (never the whole store), so each stage keeps to its own folder and a new session
    fetches only what its next step needs. `inputs` are read-only folders that `pull` also looks in (on
    Kaggle: earlier notebooks' outputs added as input). Local copies are atomic, like every other write
    here. `log` lists this session's commits (files and bytes), `summary` says it in one line.
    """

    def __init__(self, location: str, root: str | Path, token: str | None = None,
                 progress_minutes: float = PROGRESS_MINUTES, inputs: list[Path] | None = None):  # fmt: skip
        self.location, self.root, self.token = location, Path(root), token
        self.progress_minutes, self.inputs, self.log = progress_minutes, list(inputs or []), []
        self._later: list[Path] = []  # small records that ride along with the next commit (`later`)
        self._dropped = False  # whether this session deleted or replaced files (that a squash would free)
        self.session = f"{time.time():.0f}-{os.getpid()}"  # tells this session's commits in the ledger
        if location and not self._on_folder and not token:
            _checked_repo(location, token, "")  # raises: a Hub repo needs a token

    @property
    def _on_folder(self) -> bool:
        return looks_local(self.location)

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

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(token=self.token)

    def _hub_files(self) -> set[str]:
        """Files in the Hub repo (listed once, until the next commit); none when the repo does not exist yet.
        Any other failure (network, rate limit) raises: resuming as if the store were empty would retrain
        from scratch and then overwrite the store's newer checkpoints."""
        if not hasattr(self, "_files"):
            from huggingface_hub.errors import RepositoryNotFoundError

            try:
                self._files = set(self._api().list_repo_files(self.location))
            except RepositoryNotFoundError:
                self._files = set()
        return self._files

    def _record(self, kind: str, added: list[tuple[str, int]] = (), deleted: list[str] = ()) -> None:
        """One commit of this session in `log` (and, for a folder store, in its ledger file: there the
        write check and the squash are recorded too, as the commits a Hub repo would get)."""
        entry = {"session": self.session, "time": time.time(), "kind": kind, "added": [f for f, _ in added]}
        entry.update(bytes=sum(n for _, n in added), sizes=[n for _, n in added], deleted=list(deleted))
        self.log.append(entry)
        if self._on_folder:
            ledger = Path(self.location).expanduser() / LEDGER
            ledger.parent.mkdir(parents=True, exist_ok=True)
            with open(ledger, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def check_writable(self) -> str:
        """Make sure the store can be written, before any work: create the private repo and make one small
        commit (or write a file into the folder). Raises PermissionError with the fix; returns a line."""
        if not self:
            return "store: none"
        if self._on_folder:
            folder = Path(self.location).expanduser()
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check."):
                    pass
            except OSError as e:
                raise PermissionError(
                    f"STORE={self.location!r}: cannot write there ({e}); choose another"
                ) from e
            self._record("check")
            return f"store: {self.location} is writable"
        try:
            api = self._api()
            api.create_repo(self.location, exist_ok=True, private=True)
            note = f"written by the warp-imdb notebooks; last write check {time.strftime('%Y-%m-%d %H:%M')}\n"
            api.upload_file(path_or_fileobj=note.encode(), path_in_repo=".warp-store", repo_id=self.location,
                            commit_message="warp-imdb: write check")  # fmt: skip
        except Exception as e:
            raise PermissionError(
                f"STORE={self.location!r}: cannot create or write the Hub repo ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). The HF_TOKEN must be a write token "
                "(huggingface.co/settings/tokens) and the repo yours or your organisation's"
            ) from e
        self._record("check", [(".warp-store", len(note))])
        self.__dict__.pop("_files", None)
        return f"store: {self.location} is writable (private Hub repo)"

    def later(self, *paths: str | Path) -> None:
        """Store small records (a config, a timing) with the next commit instead of one of their own: the
        Hub counts commits, and a record matters only beside the results it describes."""
        self._later += [Path(p) for p in paths if Path(p) not in self._later]

    def push(self, *paths: str | Path, delete=()) -> bool:
        """Copy files or folders (under `root`) into the store and remove `delete` from it, all in one
        commit with the records waiting for one (`later`) (a folder replaces the store's copy whole; on
        the Hub the commit is atomic, so what is deleted goes only with what replaces it). True only when
        there is a store and every path that exists reached it; a failure warns (the local copy is intact
        and a later push carries it), so a caller says "stored" only on True."""
        if not self:
            return False
        items, outside, waiting = [], False, [p for p in self._later if p not in map(Path, paths)]
        for path in map(Path, [*paths, *waiting]):
            rel = self._rel(path)
            if rel is None:
                warnings.warn(f"{path} is outside {self.root}: not pushed to the store", stacklevel=2)
                outside = True
            elif path.exists():
                items.append((path, rel))
        files = [
            (f, f"{rel}/{f.relative_to(path).as_posix()}" if path.is_dir() else rel)
            for path, rel in items
            for f in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
        ]
        gone = self._held(delete)
        if not items and not gone:
            return not outside
        try:
            replaced = bool(gone) or bool(self._held([path for path, _ in items]))
        except Exception:  # the listing is bookkeeping: if it fails, squash at the end to be safe
            replaced = True
        try:
            self._commit(items, files, gone)
            self._dropped |= replaced
        except Exception as e:
            warnings.warn(
                f"could not push {', '.join(map(str, paths))} to {self.location} ({type(e).__name__}: {e})",
                stacklevel=2,
            )
            return False
        self._record("commit", [(rel, f.stat().st_size) for f, rel in files], gone)
        self._later = []
        return not outside

    def _held(self, paths) -> list[str]:
        """The store's files (Hub) or entries (folder) under the local `paths`."""
        rels = [r for r in (self._rel(p) for p in paths if p) if r is not None]
        if not rels:
            return []
        if not self._on_folder:
            return sorted(f for f in self._hub_files() for r in rels if f == r or f.startswith(r + "/"))
        return [r for r in rels if (Path(self.location).expanduser() / r).exists()]

    def _commit(self, items: list[tuple[Path, str]], files: list[tuple[Path, str]], gone: list[str]) -> None:
        if not self._on_folder:
            from huggingface_hub import CommitOperationAdd, CommitOperationDelete

            api = self._api()
            api.create_repo(self.location, exist_ok=True, private=True)
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)) for f, rel in files]
            ops += [CommitOperationDelete(path_in_repo=f) for f in gone]
            names = [rel for _, rel in items] or [f"delete {g}" for g in gone]
            message = "store " + ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            api.create_commit(self.location, operations=ops, commit_message=message)
            self.__dict__.pop("_files", None)  # listed again at the next pull
            return
        base = Path(self.location).expanduser()
        for path, rel in items:
            if path.is_dir():
                with atomic_dir(base / rel) as tmp:
                    shutil.copytree(path, tmp, dirs_exist_ok=True)
            else:
                with _atomic_file(base / rel, "wb") as out, open(path, "rb") as src:
                    shutil.copyfileobj(src, out)
        for rel in gone:
            remove(base / rel)

    def push_progress(self, path: str | Path, since: float, *also: str | Path) -> bool:
        """Push a run's progress checkpoint (with `also`, what a resume from it needs, e.g. the snapshots
        before it) only when more than `progress_minutes` have passed since `since` (the `time.time()` of
        the run's last stored state, or of its start in this session); it replaces the one before at the
        same place. True when pushed (the caller's new `since`)."""
        if not self or (time.time() - since) / 60 < self.progress_minutes:
            return False
        return self.push(path, *also)

    def holds(self, path: str | Path) -> bool:
        """True when the store has `path` (a local path under `root`): a file, or a folder with files."""
        return bool(self) and bool(self._held([path]))

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
        """At a notebook's end: commit the records still waiting (`later`), then, on the Hub, if this session
        deleted or replaced files, squash the repo's history into one commit, so that they (GBs) stop
        counting against the account's storage; a folder keeps no history. A failure only warns."""
        if not self:
            return
        if self._later:  # the records waiting for a commit go first
            self.push()
        if not self._dropped:  # nothing deleted or replaced: the history holds nothing to free
            return
        if self._on_folder:
            self._record("squash")  # nothing to do in a folder; in the ledger, the Hub's commit it stands for
            return
        try:
            self._api().super_squash_history(self.location)
            self._record("squash")
        except Exception as e:
            warnings.warn(
                f"could not squash the history of {self.location} ({type(e).__name__}: {e})", stacklevel=2
            )

    def size(self) -> int:
        """Bytes the store holds now."""
        if not self:
            return 0
        if self._on_folder:
            return folder_bytes(Path(self.location).expanduser())
        info = self._api().list_repo_tree(self.location, recursive=True)
        return sum(getattr(f, "size", 0) or 0 for f in info)

    def summary(self) -> str:
        """One line: what this session committed to the store, and how much the store holds."""
        if not self:
            return "store: none; nothing was stored"
        commits, sent = len(self.log), sum(e["bytes"] for e in self.log)
        try:
            held = f"; it holds {self.size() / 1e9:.2f} GB"
        except Exception as e:  # the size is information, not a reason to fail a finished notebook
            held = f"; its size could not be read ({type(e).__name__})"
        return f"store {self.location}: {commits} commit(s) this session, {sent / 1e9:.2f} GB uploaded{held}"

    def pull(self, *paths: str | Path) -> None:
        """Copy files or folders (local paths under `root`) from the store, or from an input, where they are
        missing locally; what neither holds is skipped. A missing folder appears whole or not at all; into
        a folder that exists, the entries it lacks are pulled the same way (e.g. the REINFORCE snapshots
        that were released to free disk)."""
        if not self and not self.inputs:
            return
        for local in map(Path, paths):
            rel = self._rel(local)
            if rel is None:
                continue
            if local.is_dir():
                self.pull(*(local / name for name in self._children(rel)))
                continue
            if local.exists():
                continue
            if self and not self._on_folder:
                files = sorted(f for f in self._hub_files() if f == rel or f.startswith(rel + "/"))
                if files:
                    self._pull_hub(files, rel, local)
                    continue
            sources = ([Path(self.location).expanduser()] if self and self._on_folder else []) + self.inputs
            src = next((s / rel for s in sources if (s / rel).exists()), None)
            if src is not None and src.is_dir():
                with atomic_dir(local) as tmp:
                    shutil.copytree(src, tmp, dirs_exist_ok=True)
            elif src is not None:
                with _atomic_file(local, "wb") as f, open(src, "rb") as s:
                    shutil.copyfileobj(s, f)

    def _children(self, rel: str) -> set[str]:
        """Names directly inside the store's (and the inputs') folder `rel`, without the hidden ones (an
        interrupted copy's temporary folder)."""
        names = set()
        if self and not self._on_folder:
            names = {f[len(rel) + 1 :].split("/")[0] for f in self._hub_files() if f.startswith(rel + "/")}
        for base in ([Path(self.location).expanduser()] if self and self._on_folder else []) + self.inputs:
            folder = base / rel
            names |= {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        return {n for n in names if not n.startswith(".")}

    def _pull_hub(self, files: list[str], rel: str, local: Path) -> None:
        """Download `files` (all under `rel`) into a temporary folder, then move them into place at once."""
        from huggingface_hub import hf_hub_download

        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}."))
        try:
            for f in files:  # each with its own progress bar
                hf_hub_download(self.location, f, local_dir=str(tmp), token=self.token)
            os.replace(tmp / rel, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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
