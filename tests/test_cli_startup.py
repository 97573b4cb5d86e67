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
