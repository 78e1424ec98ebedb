"""Writing and checking the files of a run directory.

Every file is written under a temporary name in its final directory and renamed when complete,
so no file ever appears under its final name half-written. `manifest.json` is written last and
marks a directory as complete; it carries the checksums the readers verify.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from pipeline import FORMAT_VERSION, GistError, __version__

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"gist": __version__, "python": platform.python_version()}
    for name in ("torch", "sentence-transformers", "transformers", "faiss-cpu", "faiss-gpu", "pyarrow", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def versions_text() -> str:
    """`package_versions()` one per line, as `gist --version` and `python -m pipeline` print them."""
    return "\n".join(f"{name} {version}" for name, version in package_versions().items())


def write_manifest(out_dir: Path, files: list[str], **fields) -> dict:
    """Write `manifest.json` last: format version, package versions, checksums of `files`, `fields`."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "versions": package_versions(),
        "files": {name: {"sha256": sha256_file(out_dir / name), "bytes": (out_dir / name).stat().st_size} for name in files},
        **fields,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(run_dir: Path) -> dict:
    """Read a complete run directory's manifest; refuse incomplete directories and other versions."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise GistError(f"{run_dir}: no {MANIFEST}; not a finished gist run directory (was stage 1 interrupted?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GistError(f"{path}: corrupt manifest ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GistError(
            f"{path}: format version {manifest.get('format_version')} but this gist reads {FORMAT_VERSION}; "
            "re-run stage 1 with this version"
        )
    return manifest


def verify_checksum(run_dir: Path, name: str, manifest: dict) -> Path:
    """Return the path of `name` in `run_dir` after checking it against the manifest's checksum."""
    path = Path(run_dir) / name
    expected = manifest.get("files", {}).get(name, {}).get("sha256")
    if expected is None:
        raise GistError(f"{run_dir}/{MANIFEST} lists no {name}")
    if not path.is_file():
        raise GistError(f"{path}: missing")
    if sha256_file(path) != expected:
        raise GistError(f"{path}: checksum does not match {MANIFEST}; the file was modified or is corrupt")
    return path


LOCK = ".gist.lock"


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` for this process while the block runs: a second gist writing into it is
    refused with a clear message. An flock, so the kernel releases it when the process ends,
    killed or not: no stale lock to clean up. Creates `out_dir` if needed."""
    import fcntl

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / LOCK, "a+")
    except OSError as e:
        raise GistError(f"{out_dir}: output directory is not writable ({e.strerror})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise GistError(f"{out_dir} is being written by another gist ({holder}); wait for it to finish or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def prepare_out_dir(out_dir: Path, overwrite: bool, owned: list[str]) -> None:
    """Refuse an `out_dir` that holds a finished run unless `overwrite`. Called inside
    `exclusive(out_dir)`, which has created it and shown it writable.

    A directory holding only the temporary parts of an interrupted run is reused (resume).
    With `overwrite`, only files gist writes (`owned`) are removed, never the user's other files.
    """
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        if not overwrite:
            raise GistError(f"{out_dir} already holds a finished run; pass --overwrite or choose another --out")
        for name in [*owned, MANIFEST]:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
