"""The model is the spec: zimage_native/model/ is plain PyTorch and imports nothing from the speed
layer, the kernels, the pipeline or third-party model libraries."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "zimage_native" / "model"
ALLOWED_TOP = {"torch", "math", "dataclasses", "__future__", "typing"}
ALLOWED_OWN = {"config", "model"}  # zimage_native.config and zimage_native.model.*


def imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
    return out


def test_model_imports_only_torch_and_its_own_modules():
    problems = []
    for path in sorted(MODEL.glob("*.py")):
        for module, level in imports(path):
            if level == 0:
                if module.startswith(("zimage_native.config", "zimage_native.model")):
                    continue
                if module.split(".")[0] not in ALLOWED_TOP:
                    problems.append(f"{path.name}: import {module}")
            elif level == 1:  # from .x: a sibling in model/
                continue
            elif level == 2 and module.split(".")[0] not in ALLOWED_OWN:  # from ..x: zimage_native.x
                problems.append(f"{path.name}: from ..{module}")
    assert not problems, problems
