"""Print one command of the README's "Set up" section: `run` (the first bash block) or `test` (the second).

CI runs these words exactly, so the README cannot drift from what is checked."""

import re
import sys
from pathlib import Path

section = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text().split("## Set up", 1)[1]
blocks = re.findall(r"```bash\n(.*?)\n```", section.split("\n## ", 1)[0], re.S)
print(blocks[{"run": 0, "test": 1}[sys.argv[1]]].strip())
