"""scripts/README.md sorts every script in the folder: a new script without an entry, or an entry whose script is
gone, fails here (the page is how a newcomer finds the driver that measured a number)."""

import re
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_every_script_is_listed_and_every_listed_script_exists():
    files = {p.name for p in SCRIPTS.iterdir() if p.suffix in (".py", ".sh")}
    listed = set(re.findall(r"`([\w.-]+\.(?:py|sh))`", (SCRIPTS / "README.md").read_text()))
    assert sorted(files - listed) == [], "scripts missing from scripts/README.md"
    assert sorted(listed - files) == [], "scripts/README.md names scripts that are not there"
