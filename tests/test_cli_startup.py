"""Commands that run no model start without importing torch, transformers or the engine's model code
(each in a fresh interpreter, since the test process itself has torch loaded)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "diffusers", "safetensors.torch", "zimage_native.pipeline", "zimage_native.model",
         "zimage_native.accel", "zimage_native.loading", "zimage_native.prompt.rewriter")

PROBE = f"""
import json, sys
from zimage_native.cli import main
try:
    main(sys.argv[1:], prog_name="zimage", standalone_mode=False)
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""


def loaded_after(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                         cwd="/")  # not the repository root, whose kernels/ folder is not a package to import
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"], ["templates", "list"], ["templates", "show", "photo-aerial-drone"],
    ["format-prompt", "a cat", "--force-think-block"], ["generate", "--help"], ["serve", "--help"],
    ["rewrite", "--help"], ["info", "--help"], ["convert", "--help"], ["bench", "--help"],
], ids=" ".join)
def test_commands_that_run_no_model_do_not_import_torch(args):
    assert loaded_after(*args) == []


def test_importing_the_package_does_not_import_torch_until_a_model_name_is_used():
    code = ("import sys, zimage_native as zn; assert 'torch' not in sys.modules; "
            "zn.format_prompt('a'); assert 'torch' not in sys.modules; zn.ZImagePipeline; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


CTRL_C_PROBE = """
import os, signal, sys
from zimage_native.cli import main

def chat_rewriter(*args):  # Ctrl-C while the command sets up, landing in {where}
    code = "os.kill(os.getpid(), signal.SIGINT)\\nimport time\\nfor _ in range(200): time.sleep(0.05)"
    if {in_exec}:
        exec(code, {{"os": os, "signal": signal}})
    else:
        os.kill(os.getpid(), signal.SIGINT)
        import time
        for _ in range(200): time.sleep(0.05)

sys.modules["zimage_native.cli.rewrite"].chat_rewriter = chat_rewriter
main(sys.argv[1:], prog_name="zimage")
"""


@pytest.mark.parametrize("in_exec", [True, False], ids=["in code run from a string", "in plain code"])
def test_ctrl_c_while_loading_exits_130_under_python_m(tmp_path, in_exec):
    """`python -m zimage_native.cli generate` interrupted while loading ended by the signal after its
    'interrupted' line in 3 of 12 tries (returncode -2, not 130): CPython marks the process to end by
    SIGINT when a KeyboardInterrupt leaves code run from a string (a dataclass's generated __init__, as
    torch and transformers make while they import), even one the CLI catches. The probe runs the real
    `python -m` entry, signal and handler (the group's, the same for every command: `rewrite --llm-url`
    here, which imports no torch, 2 s rather than 15); only where the signal lands is fixed."""
    import os
    import signal
    from pathlib import Path

    (tmp_path / "ctrl_c_probe.py").write_text(CTRL_C_PROBE.format(where="a string" if in_exec else "a function",
                                                                 in_exec=in_exec))
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "ctrl_c_probe", "rewrite", "a cat", "--llm-url", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
                         # a job started in the background inherits SIGINT ignored: the test needs it live
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (out.returncode, out.stderr.strip()) == (130, "interrupted"), (out.returncode, out.stderr[-2000:])


# Imported at start-up (PYTHONPATH): SIGINT at the moment the CLI imports its generate command, as a Ctrl-C
# right after typing the command would land.
SIGINT_ON_IMPORT = """
import importlib.abc, os, signal, sys, time

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "zimage_native.cli.generate":
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # the handler runs here
            except {caught}:  # code that catches everything on the way
                pass
        return None

sys.meta_path.insert(0, Interrupt())
"""

SCRIPT = """import sys
from zimage_native.cli import main
if __name__ == "__main__":
    sys.exit(main())
"""


@pytest.mark.parametrize("how, caught", [("script", "()"), ("python -m", "()"), ("a program", "()"),
                                         ("script", "BaseException")])
def test_ctrl_c_while_the_cli_imports_exits_130_without_a_traceback(tmp_path, how, caught):
    """Ctrl-C in the first half second of `zimage ...` (installed; while click and the commands import) printed
    Python's import traceback (7 to 46 lines, 7 of 9 tries at 0.2 to 0.5 s) and ended by the signal: the
    `zimage` script and `python -m zimage_native.cli` print `interrupted` and exit 130 now. A program that
    imports the CLI keeps Python's KeyboardInterrupt. Where the exit is caught on its way (BaseException: code
    that catches everything), the run still stops: it went on after saying `interrupted` (exit 0, once in 23
    tries)."""
    import os
    import signal
    from pathlib import Path

    (tmp_path / "sitecustomize.py").write_text(SIGINT_ON_IMPORT.format(caught=caught))
    (tmp_path / "zimage").write_text(SCRIPT)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")]))
    args = {"script": [str(tmp_path / "zimage")], "python -m": ["-m", "zimage_native.cli"],
            "a program": ["-c", "import zimage_native.cli"]}[how]
    out = subprocess.run([sys.executable, *args, "--version"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if how == "a program":
        assert out.returncode == -signal.SIGINT and out.stderr.strip().endswith("KeyboardInterrupt"), out.stderr
    else:
        assert (out.returncode, out.stderr.strip()) == (130, "interrupted"), (out.returncode, out.stderr[-2000:])
