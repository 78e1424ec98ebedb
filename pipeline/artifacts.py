"""Writing and checking the files of a run directory.

Every file is written under a temporary name in its final directory and renamed when complete,
so no file ever appears under its final name half-written. `manifest.json` is written last and
marks a directory as complete; it carries each file's size, sha256 and a sampled checksum.

Opening a run reads none of its large files whole: readers check each file's size and, above
FULL_CHECK_BYTES, a sha256 over SAMPLE_BLOCKS blocks spread over the file (a truncated or extended
file, or a damaged sampled block, is refused); smaller files are hashed whole. `gist verify`
(`verify_run`) hashes every file whole against the manifest, for damage between the sampled blocks.
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
FULL_CHECK_BYTES = 1 << 26  # files up to 64 MiB are hashed whole at open (tens of ms)
SAMPLE_BLOCKS = 64  # larger ones: this many blocks, evenly spaced from the first byte to the last...
SAMPLE_BLOCK_BYTES = 1 << 16  # ... of 64 KiB each: 4 MiB read at open, at any file size


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


def sampled_sha256(path: Path) -> str:
    """sha256 over the file's size and SAMPLE_BLOCKS blocks of SAMPLE_BLOCK_BYTES spread evenly from
    its start to its end (the whole file when it is smaller than the blocks together)."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode() + b"\0")
    span = max(size - SAMPLE_BLOCK_BYTES, 0)
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
            digest.update(f.read())
        else:
            for k in range(SAMPLE_BLOCKS):
                f.seek(k * span // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """A file's manifest entry: size, sha256 (read whole, once, by the writer) and sampled sha256."""
    return {"sha256": sha256_file(path), "sampled_sha256": sampled_sha256(path), "bytes": Path(path).stat().st_size}


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
    """Write `manifest.json` last: format version, package versions, `file_record` of `files`, `fields`."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "versions": package_versions(),
        "files": {name: file_record(out_dir / name) for name in files},
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


def verify_checksum(run_dir: Path, name: str, manifest: dict, full: bool = False) -> Path:
    """Return the path of `name` in `run_dir` after checking it against its manifest entry.

    Its size always; then its sha256 if `full` or it is at most FULL_CHECK_BYTES, else its sampled
    sha256 (an entry written before sampled checksums existed is hashed whole).
    """
    path = Path(run_dir) / name
    record = manifest.get("files", {}).get(name)
    if record is None:
        raise GistError(f"{run_dir}/{MANIFEST} lists no {name}")
    if not path.is_file():
        raise GistError(f"{path}: missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise GistError(f"{path}: checksum does not match {MANIFEST} ({size} bytes, {record['bytes']} recorded); the file was truncated or modified")
    whole = full or size <= FULL_CHECK_BYTES or "sampled_sha256" not in record
    if (sha256_file(path) != record["sha256"]) if whole else (sampled_sha256(path) != record["sampled_sha256"]):
        raise GistError(f"{path}: checksum does not match {MANIFEST}; the file was modified or is corrupt")
    return path


def verify_run(run_dir: Path) -> dict:
    """`gist verify`: every file the manifest lists, hashed whole, in the manifest's order; the first
    that is missing or differs raises GistError naming it. Returns the manifest."""
    manifest = read_manifest(run_dir)
    for name in manifest.get("files", {}):
        verify_checksum(run_dir, name, manifest, full=True)
    return manifest


def guide_dir_of(run_dir: Path, manifest: dict | None = None) -> Path:
    """The guide pass of a precompute-guide (itself) or plan directory (the one it was planned from)."""
    manifest = manifest or read_manifest(run_dir)
    kind = manifest.get("kind")
    if kind == "guide-pass":
        return Path(run_dir)
    if kind == "plan":
        return Path(manifest["guide_dir"])
    raise GistError(f"{run_dir}: not a precompute-guide or plan directory (kind {kind!r})")
