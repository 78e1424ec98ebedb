"""One lifecycle for every output a gist command writes.

Every command that writes (`precompute-guide`, `plan`, `mine`, `filter`, `report`, `train`,
`evaluate --out`) goes through `Output`, in this order:

1. The command opens and validates every input and option first. `Output.check()` is read-only:
   OUT must not be, contain, or lie inside any input; an existing OUT must be a finished output of
   the same kind that gist wrote (found by its record file's "kind"), and then only with --overwrite.
2. `Output.stage(key)` builds the new result in a staging directory beside OUT,
   `.<name>.gist-stage/` (same filesystem, so the final renames are atomic), held with an flock so a
   second gist writing OUT is refused. The stage records its `key` (for a guide pass: the guide's
   identity and encoding settings, the data's fingerprint): a stage left by a killed run with the
   same kind and key that holds resumable work is resumed (its temporary files removed), any other
   is discarded — a run never resumes what another guide, dataset or setting made. A training run
   refuses instead to discard checkpoints of other settings, or another command's stage.
3. On success the result is swapped in: an old OUT (overwrite) is moved aside only now, and removed
   with the stage. On failure the stage is removed, unless it holds resumable work (`keep_when`).

Directory kinds (a guide pass, a plan, a report, a training run) are staged whole; file kinds (mined
negatives, filtered data and its summary, evaluation results) stage their files. With --overwrite,
a user's own files inside an old output directory are carried over to the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import GistError

STAGE_SUFFIX = ".gist-stage"
STAGE_RECORD = "stage.json"  # kind and key of the run the stage belongs to
LOCK = ".lock"


@dataclass(frozen=True)
class Kind:
    """What a command writes. `record` names the file that carries `"kind": name` (inside the
    directory for directory kinds; for file kinds, a path beside or equal to OUT, given by a
    function of OUT); `owned` are the entries a directory kind writes (what --overwrite replaces)."""

    name: str
    directory: bool
    record: str | Callable[[Path], Path]
    owned: tuple[str, ...] = ()
    companions: Callable[[Path], list[Path]] = field(default=lambda out: [])

    def record_path(self, out: Path) -> Path:
        return out / self.record if self.directory else self.record(out)


def _records_in(path: Path) -> list[Path]:
    """Where an existing `path` would carry a gist record: itself (a file kind), or a directory's JSON files
    (every directory kind's record is one: manifest.json, run.json, report.json, ...)."""
    return [path] if path.is_file() else sorted(path.glob("*.json"))


def stage_dir(out: Path) -> Path:
    """Where the output `out` is built before it is swapped in."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGE_SUFFIX}"


def read_kind(record: Path) -> dict | None:
    """The gist record of an output (`kind`, ...): a JSON object, or a Parquet file's `gist` metadata; None if not one."""
    try:
        if record.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(record).metadata or {}
            found = json.loads(meta.get(b"gist", b"null"))
        else:
            found = json.loads(record.read_text())
    except Exception:  # noqa: BLE001 - an unreadable record (not JSON, not Parquet, not ours) is "not gist's"
        return None
    return found if isinstance(found, dict) and isinstance(found.get("kind"), str) else None


def _overlaps(out: Path, path: Path) -> bool:
    """OUT is `path`, contains it, or lies inside it."""
    return out == path or out in path.parents or path in out.parents


class Stage:
    """A result being built: `dir` is the new directory (directory kinds) or the folder holding the
    new files (file kinds, at `path(final)`); `work` holds resumable scratch that is never part of
    the result; `resumed` says the stage holds resumable work left by a killed run with the same key."""

    def __init__(self, root: Path, resumed: bool):
        self.root, self.resumed = root, resumed
        self.dir, self.work = root / "new", root / "work"
        self._keep: list[Callable[[], bool]] = []

    def path(self, final: Path) -> Path:
        """Where the file kind's output `final` (OUT or a companion) is staged."""
        return self.dir / Path(final).name

    def keep_when(self, condition: Callable[[], bool]) -> None:
        """A failed run keeps the stage (for the same command to resume) while `condition()` holds."""
        self._keep.append(condition)

    def keeps(self) -> bool:
        return any(condition() for condition in self._keep)


class Output:
    """OUT of one command: `check()` before any work, then `with stage(key) as s:` to build it.

    `inputs` maps a label (as the user knows it: DATA, GUIDE_DIR, --student) to each path the command
    reads; `overwrite` is None for a command without --overwrite (messages then never suggest it).
    """

    def __init__(self, path: str | Path, kind: Kind, *, inputs: dict[str, str | Path | None] | None = None,
                 overwrite: bool | None = False, option: str = "--out"):
        # The real path: a symlink or an empty directory given as OUT (a mount point) is written through,
        # `--out .` and `x/../x` name one place, and its stage lies beside what is really written.
        self.path, self.kind, self.option = Path(os.path.realpath(path)), kind, option
        self.inputs = {label: Path(p) for label, p in (inputs or {}).items() if p is not None}
        self.overwrite = overwrite

    @property
    def finals(self) -> list[Path]:
        """The paths the output occupies, its record last (swapped in last)."""
        return [self.path, *self.kind.companions(self.path)]

    @property
    def root(self) -> Path:
        """The stage: beside OUT, or beside a file kind's record (two outputs sharing a record share a stage and its lock)."""
        return stage_dir(self.path if self.kind.directory else self.kind.record_path(self.path))

    def check(self) -> None:
        """Read-only: refuse an OUT that overlaps an input, an existing one this command may not replace,
        or one that cannot be written."""
        for final in [*self.finals, self.root]:
            for label, path in self.inputs.items():
                if _overlaps(final, path.resolve()):
                    raise GistError(f"{self.option} {self.path} is, contains or lies inside {label} ({path}); gist never writes into what it reads: choose another {self.option}")
        writable = next(parent for parent in self.root.parents if parent.exists())
        if not writable.is_dir():
            raise GistError(f"{self.path}: the output directory is not writable ({writable} is a file, not a directory); choose another {self.option}")
        if not os.access(writable, os.W_OK | os.X_OK):
            raise GistError(f"{self.path}: the output directory is not writable ({writable})")
        # An empty directory is nobody's output: a directory kind fills it; for a file kind it is in the way.
        existing = [final for final in self.finals if final.exists() and not (self.kind.directory and _empty_dir(final))]
        if not existing:
            return
        record_path = self.kind.record_path(self.path)
        record = read_kind(record_path) if record_path.is_file() else None
        if record is None:  # perhaps another kind of gist output: its record says which
            record = next(filter(None, (read_kind(p) for p in _records_in(self.path))), None)
        if record is None or record["kind"] != self.kind.name:
            what = f"a gist {record['kind']} output" if record else "not written by gist"
            raise GistError(f"{existing[0]} exists and is {what}, not a gist {self.kind.name} output; choose another {self.option}")
        named = Path(str(record.get("out", self.path))).name
        if named != self.path.name:
            raise GistError(f"{record_path} is the record of another gist {self.kind.name} output ({named}); choose another {self.option}")
        if self.overwrite is None:
            raise GistError(f"{self.path} already holds a finished {self.kind.name} output; choose another {self.option}")
        if not self.overwrite:
            raise GistError(f"{self.path} already holds a finished {self.kind.name} output; pass --overwrite to replace it or choose another {self.option}")

    @contextlib.contextmanager
    def stage(self, key: dict | None = None, *, rank: int = 0, world_size: int = 1, discard: bool = True,
              resumable: Callable[[Path], bool] = lambda new: True) -> Iterator[Stage]:
        """Build the output in its stage and swap it in when the block succeeds (see the module docstring).

        `key`: what a killed run must share to be resumed (None: never resumed). `resumable(new)`:
        whether a killed run's staged directory holds work to resume (a training run: a complete
        checkpoint); one that holds none is started afresh. `discard=False` refuses, rather than
        discards, a resumable stage of another key (a training run's checkpoints) and a non-empty
        stage of another command. Under torchrun rank 0 checks, locks, prepares and commits; every
        rank gets the same paths and the same `resumed`, once rank 0 has prepared the stage.
        """
        from pipeline.guide import share

        root = self.root
        if rank != 0:
            yield Stage(root, resumed=share(None, world_size))  # once rank 0 has prepared the stage, its verdict
            return
        self.check()
        ancestors, ours = _missing_ancestors(root), not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            handle = open(root / LOCK, "a+")
        except OSError as e:
            raise GistError(f"{self.path}: the output directory is not writable ({e.strerror})") from None
        try:
            try:
                _lock(handle, self.path)  # another gist's stage: refused and left alone
            except BaseException:
                _remove_empty(ancestors)
                raise
            try:
                stage = Stage(root, resumed=self._reopen(root, key, discard, resumable))  # a refused interrupted run is left as it was
            except BaseException:
                _remove_empty(([root] if ours else []) + ancestors, whole=ours)
                raise
            try:
                share(stage.resumed, world_size)
                yield stage
                self._commit(stage)
            except BaseException:
                if not stage.keeps():
                    _remove_empty([root, *ancestors], whole=True)
                raise
        finally:
            handle.close()  # releases the lock

    def _reopen(self, root: Path, key: dict | None, discard: bool, resumable: Callable[[Path], bool]) -> bool:
        """Resume the resumable stage of a killed run with the same kind and key (its temporary files
        removed), else start it empty. Returns whether it was resumed."""
        record = root / STAGE_RECORD
        mine = {"kind": self.kind.name, "key": key}
        try:
            found = json.loads(record.read_text()) if record.is_file() else None
        except (OSError, ValueError):
            found = None
        new = root / "new"
        same_kind = (found or {}).get("kind") == self.kind.name
        # What a killed run left that is worth keeping: resumable work of this kind; anything of another kind or none.
        holds_work = new.is_dir() and (resumable(new) if same_kind else any(new.iterdir()))
        if key is not None and found == mine and holds_work:
            # A killed run's temporary files: atomic writes anywhere in the stage, parts being joined.
            for leftover in [*new.glob(".*"), *root.rglob("*.tmp-*")]:
                _remove(leftover)
            return True
        if not discard and holds_work and not same_kind:
            raise GistError(f"{root} holds an interrupted gist {(found or {}).get('kind', 'unknown')} run; "
                            f"choose another {self.option}, or remove {root} to start afresh")
        if not discard and holds_work and found != mine:
            stored = (found or {}).get("key") or {}
            differ = sorted(k for k in {**stored, **(key or {})} if stored.get(k) != (key or {}).get(k))
            shown = "; ".join(f"{k}: {stored.get(k)} -> {(key or {}).get(k)}" for k in differ[:6])
            raise GistError(f"{root} holds an interrupted {self.kind.name} run with other settings ({shown}); "
                            f"run it again with the same options, or remove {root} to start afresh")
        for entry in root.iterdir():
            if entry.name != LOCK:
                _remove(entry)
        new.mkdir()
        (root / "work").mkdir()
        tmp = root / f".{STAGE_RECORD}.tmp"
        tmp.write_text(json.dumps(mine, sort_keys=True))
        os.replace(tmp, record)
        return False

    def _commit(self, stage: Stage) -> None:
        """Swap the staged result in: an old output is moved aside only now (the user's own files in it
        carried into the new one), the record last. Ctrl-C and SIGTERM wait until the swap is done; a
        failure on the way puts every moved entry back."""
        self.check()  # under the lock: an OUT that appeared meanwhile is not replaced without --overwrite
        old = stage.root / "old"
        old.mkdir()
        moves: list[tuple[Path, Path]] = []

        def move(source: Path, target: Path) -> None:
            os.replace(source, target)
            moves.append((source, target))

        swapped = False
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if not self.kind.directory:
                for final in self.finals:
                    if not stage.path(final).exists():
                        raise GistError(f"internal: {final.name} was not written")  # a command that forgot part of its output
                    if final.exists() or final.is_symlink():
                        move(final, old / final.name)
                    move(stage.path(final), final)
            elif _empty_dir(self.path):  # an empty directory (a mount point, say): filled, the record last
                for entry in sorted(stage.dir.iterdir(), key=lambda entry: entry.name == self.kind.record):
                    move(entry, self.path / entry.name)
            else:
                if self.path.exists():  # an earlier output of this kind (check): the user's own files stay
                    for entry in self.path.iterdir():
                        if entry.name not in self.kind.owned and not (stage.dir / entry.name).exists():
                            move(entry, stage.dir / entry.name)
                    move(self.path, old / self.path.name)
                move(stage.dir, self.path)
            swapped = True
        except BaseException:
            for source, target in reversed(moves):
                os.replace(target, source)
            raise
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C held back during the swap arrives here
            finally:
                if swapped:
                    _remove(stage.root)  # OUT is complete: its stage (with any old output moved aside) goes, interrupted or not


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _missing_ancestors(path: Path) -> list[Path]:
    """Directories that creating `path` creates, innermost first (removed again if the run leaves nothing)."""
    missing = []
    for parent in Path(path).parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _lock(handle, out: Path) -> None:
    """An flock on the stage: the kernel releases it when the process ends, killed or not."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise GistError(f"{out} is being written by another gist ({holder}); wait for it to finish or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {platform.node()}")
    handle.flush()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_empty(paths: list[Path], whole: bool = False) -> None:
    """Remove directories this run created, innermost first, each only if empty; with `whole`, the
    first (the run's own stage) whatever it holds."""
    for number, directory in enumerate(paths):
        if whole and number == 0:
            _remove(directory)
        else:
            with contextlib.suppress(OSError):
                directory.rmdir()
