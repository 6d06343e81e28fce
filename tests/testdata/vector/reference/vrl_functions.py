"""List the VRL functions Vector 0.57 ships, from the VRL commit its Cargo.lock pins.

pyVRL embeds an older VRL (0.15); a function it knows but current VRL dropped or renamed would
pass here and fail in Vector. ``vrl_functions.json`` holds the names every stdlib function
declares (``fn identifier``); Vector builds VRL with its full ``stdlib`` feature.

    python tests/testdata/vector/reference/vrl_functions.py /path/to/vrl.git <commit>

Regenerating is explicit: run it, review the diff, commit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

_IDENT = re.compile(r'fn identifier\(&self\) -> &\'static str \{\s*"([a-z0-9_]+)"')


def main(repo: str, commit: str) -> None:
    text = subprocess.run(
        ["git", "-C", repo, "grep", "-h", "-A2", "fn identifier", commit, "--", "src/stdlib"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    names = sorted(set(_IDENT.findall(text)))
    doc = {
        "source": f"vectordotdev/vrl@{commit} (pinned by vectordotdev/vector v0.57.0)",
        "functions": names,
    }
    out = Path(__file__).parent / "vrl_functions.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(names)} functions")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
