"""The running worker never loads the developer tools (worker/devtools/).

Checked in a fresh interpreter, since this test process has long imported them (conftest).
The import-linter contracts in pyproject.toml check the same for every module but worker.cli,
which imports the tools inside the demo / sandbox / bench subcommands; this checks it too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LOADED_DEVTOOLS = (
    "import sys\nprint(sorted(m for m in sys.modules if m.startswith('worker.devtools')))\n"
)


def _devtools_loaded_by(code: str) -> list[str]:
    env = dict(os.environ)
    # The checkout under test first, as for this process (PYTHONPATH=. or the editable install).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code + "\n" + _LOADED_DEVTOOLS],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    loaded = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert isinstance(loaded, list)
    return loaded


def test_worker_modules_do_not_import_devtools() -> None:
    code = "import worker.cli, worker.app, worker.process, worker.consumer"
    assert _devtools_loaded_by(code) == []


def test_run_command_parser_does_not_import_devtools() -> None:
    # What `invoicing-worker run --help` does before it prints: build the whole parser.
    code = (
        "import contextlib, io\n"
        "from worker.cli import build_parser\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    build_parser().parse_args(['run', '--help'])\n"
    )
    assert _devtools_loaded_by(code) == []


def test_the_check_sees_devtools_when_they_are_loaded() -> None:
    # Guards the two tests above against passing because the check itself is broken.
    assert _devtools_loaded_by("import worker.devtools.samples") == [
        "worker.devtools",
        "worker.devtools.samples",
    ]
