"""Text every machine has: Python's standard-library sources, split into train and held-out files.

The split is by file (a hash of the relative path), so held-out text is code and docstrings the demo model
never saw. Docstring facts (`module.function(signature)`: first paragraph) feed the synthetic chats that ask
what a standard-library function does; held-out files give held-out facts.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Generated tables and vendored data that are noise, not language.
SKIPPED_PARTS = (
    "site-packages",
    "encodings/",
    "__pycache__",
    "lib2to3/tests/data",
    "test/encoded_modules",
    "test/tokenizedata",
)
SKIPPED_NAMES = ("_sysconfigdata", "unicodedata", "_pydecimal", "pydoc_data/topics.py", "test_unicodedata")
MAX_FILE_BYTES = 400_000
HELDOUT_PERCENT = 3


@dataclass(frozen=True)
class SourceFile:
    name: str  # path relative to the stdlib folder, "/"-separated
    text: str


@dataclass(frozen=True)
class DocFact:
    """One documented public function or class of the standard library."""

    qualname: str  # "json.dumps"
    signature: str  # "obj, *, skipkeys=False, ..."
    summary: str  # first paragraph of the docstring, one line


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(name: str) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def read_stdlib(folder: Path | None = None) -> list[SourceFile]:
    """Every kept `.py` file of the standard library, sorted by name (deterministic for one Python build)."""
    folder = folder or stdlib_folder()
    files = []
    for path in sorted(folder.rglob("*.py")):
        name = path.relative_to(folder).as_posix()
        if any(part in name for part in SKIPPED_PARTS) or any(s in name for s in SKIPPED_NAMES):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(SourceFile(name, text))
    return files


def split_files(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    train = [f for f in files if not is_heldout(f.name)]
    heldout = [f for f in files if is_heldout(f.name)]
    return train, heldout


def module_name(file_name: str) -> str:
    parts = file_name.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _summary(doc: str) -> str | None:
    first = doc.strip().split("\n\n")[0]
    line = " ".join(part.strip() for part in first.splitlines())
    if not (20 <= len(line) <= 220) or not line[0].isupper():
        return None
    return line if line.endswith(".") else line + "."


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(node.args)
    return args if len(args) <= 80 else args[:77] + "..."


def doc_facts(files: list[SourceFile]) -> list[DocFact]:
    """Top-level public functions and classes with a usable one-paragraph docstring."""
    facts = []
    for file in files:
        module = module_name(file.name)
        if any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(file.text)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            summary = _summary(doc) if doc else None
            if summary is None:
                continue
            if isinstance(node, ast.ClassDef):
                init = next(
                    (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None
                )
                signature = _signature(init).removeprefix("self, ").removeprefix("self") if init else ""
            else:
                signature = _signature(node)
            facts.append(DocFact(f"{module}.{node.name}", signature, summary))
    return facts


def pydoc_topics() -> dict[str, str]:
    """The English reference texts `help()` shows (pydoc_data.topics), by topic name."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def common_words(texts: list[str], *, count: int = 600) -> list[str]:
    """The most frequent plain lowercase words (3 to 9 letters) of some English text, sorted."""
    import re
    from collections import Counter

    counts = Counter(w for text in texts for w in re.findall(r"\b[a-z]{3,9}\b", text))
    return sorted(w for w, _ in counts.most_common(count))
