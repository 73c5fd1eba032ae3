"""The output folder: built in a hidden temporary sibling and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

# Files a quantized checkpoint needs besides its weights and config (tokenizer, chat template, processors).
COMPANION_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "generation_config.json",
    "*processor_config.json", "vocab*", "merges.txt", "*.model",
)  # fmt: skip


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


def check_output(src: Path, out: Path, *, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"output {out} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder; refusing to replace it")
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise ValueError(
            f"output {out} must not be the source checkpoint {src} or contain it or lie inside it"
        )


def staging_folder(out: Path) -> Path:
    """A fresh hidden folder next to `out` (same filesystem, so the final rename is atomic)."""
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def copy_companions(src: Path, dst: Path) -> list[str]:
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and any(fnmatch(item.name, p) for p in COMPANION_PATTERNS):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied


def publish(stage: Path, out: Path) -> None:
    """Move the finished folder into place, replacing an existing output only now that the new one is whole."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)


@contextlib.contextmanager
def staged_output(out: Path, *, companions_from: Path) -> Iterator[Path]:
    """Build `out` in a staging folder (yielded): when the block ends, the companion files of `companions_from`
    are copied in and the folder replaces `out`; if the block fails, the staging folder is removed and an older
    `out` stays as it was."""
    stage = staging_folder(out)
    try:
        yield stage
        copy_companions(companions_from, stage)
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
