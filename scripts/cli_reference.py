"""Write docs/reference/cli.md from the typer app in cli.py (typer's own generator), or check it.

    python scripts/cli_reference.py            # regenerate docs/reference/cli.md
    python scripts/cli_reference.py --check    # exit 1 if the committed file differs from a fresh one

`make cli-reference` runs the first; tests/test_docs.py runs the comparison. The page is never
edited by hand: change the help texts in cli.py and regenerate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference" / "cli.md"
TITLE = "CLI reference"


def generate(output: Path) -> None:
    """Run `typer cli utils docs` (the typer next to this Python) from the repository root."""
    typer = Path(sys.executable).with_name("typer")
    command = [str(typer)] if typer.exists() else [sys.executable, "-m", "typer"]
    # PYTHONPATH: this checkout's cli.py and pipeline/, not those of another editable install of gist.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([*command, "cli", "utils", "docs", "--name", "gist", "--title", TITLE, "--output", str(output)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)


def fresh() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cli.md"
        generate(path)
        return path.read_text(encoding="utf-8")


def main() -> int:
    if sys.argv[1:] == ["--check"]:
        if REFERENCE.read_text(encoding="utf-8") != fresh():
            print(f"{REFERENCE.relative_to(ROOT)} is out of date: run `make cli-reference`", file=sys.stderr)
            return 1
        return 0
    generate(REFERENCE)
    print(f"wrote {REFERENCE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
