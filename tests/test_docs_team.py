"""docs/team.md stays true: its walkthrough script (docs/examples/team_walkthrough.py) runs
against the test Hub, every command the page shows is one the script ran, and the request
counts the page quotes are what `remote list --calls` prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_team_page_is_what_its_script_prints(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "docs/examples/team_walkthrough.py"), "--part", "all",
                        "--workdir", str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ran = {line.strip() for line in r.stdout.splitlines() if line.startswith("$ [")}
    page = (ROOT / "docs/team.md").read_text(encoding="utf-8")
    shown = {line.strip() for line in page.splitlines() if line.startswith("$ [")}
    assert len(shown) >= 20
    assert shown <= ran, sorted(shown - ran)
    counts = re.findall(r"^(\d+) Hub requests?:", r.stdout, flags=re.M)
    assert counts[-4:] == ["11", "1", "3", "4"], counts  # first, unchanged, after an alias move, --refresh
    for n in ("11", "3", "4"):
        assert f"{n} Hub requests" in page
