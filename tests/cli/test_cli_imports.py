"""The README's CPU install has no triton: every command's parser and help must work without it, and the
light commands (`--help`, `plan`) must not even import torch."""

import subprocess
import sys

from nvfp4kit.cli import COMMANDS, command_in

NO_TRITON = "import sys; sys.modules['triton'] = None\n"


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_parser_builds_without_triton():
    out = run_python(NO_TRITON + "from nvfp4kit.cli import build_parser\nbuild_parser()\nprint('built')")
    assert out.strip() == "built"


def test_every_command_help_works_without_triton():
    code = NO_TRITON + (
        "from nvfp4kit.cli import COMMANDS, main\n"
        "for name in COMMANDS:\n"
        "    try:\n"
        "        main([name, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (name, exc.code)\n"
    )
    out = run_python(code)
    for name in COMMANDS:
        assert f"usage: nvfp4kit {name}" in out


def test_help_and_plan_do_not_import_torch():
    code = (
        "import contextlib, io, sys\n"
        "from nvfp4kit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    assert main(['plan', 'gemma-4-26b-a4b', '--gpu', 'rtx3090']) == 0\n"
        "print(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))\n"
    )
    assert run_python(code).strip() == "[]"


def test_the_command_is_found_after_global_options():
    assert command_in(["-v", "plan", "gemma-4-26b-a4b"]) == "plan"
    assert command_in(["--help"]) is None
