"""Packaging: kernels/ and converters/ install inside zimage_native, never as top-level packages."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_maps_folders_into_the_namespace(tmp_path):
    pytest.importorskip("setuptools", minversion="69")  # pyproject.toml's build requirements
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"))
    # Without PYTHONPATH: a checkout on it would put its kernels/ folder before the installed Hugging
    # Face ``kernels`` package in pip's build process.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, env=env)
    wheel = next((tmp_path / "dist").glob("zimage_native-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "zimage_native/kernels/__init__.py" in names
    assert "zimage_native/converters/__init__.py" in names
    assert "zimage_native/model/transformer.py" in names
    assert "zimage_native/config.example.toml" in names  # --profile NAME without --config reads it
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "converters" not in tops and "tests" not in tops
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "zimage = zimage_native.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_triton_extra_names_a_triton_each_platform_has():
    """PyPI's triton has Linux wheels only: on Windows the extra installs triton-windows, on macOS
    nothing, so that `pip install ".[test,triton]"` (the README's development install) works there."""
    from packaging.requirements import Requirement

    requirements = [Requirement(r) for r in importlib.metadata.requires("zimage-native")]

    def tritons(platform: str) -> list[str]:
        env = {"sys_platform": platform, "extra": "triton"}
        return sorted(r.name for r in requirements if "triton" in r.name and r.marker and r.marker.evaluate(env))

    assert tritons("linux") == ["triton"] and tritons("win32") == ["triton-windows"] and tritons("darwin") == []


def test_installed_subpackages_import():
    import zimage_native.converters
    import zimage_native.kernels

    assert Path(zimage_native.kernels.__file__).parent.name == "kernels"
    assert Path(zimage_native.converters.__file__).parent.name == "converters"


def test_the_checkouts_kernels_folder_does_not_shadow_the_hub_package():
    """From the checkout's root (``python -m zimage_native.cli bench`` in benchmarks/gpu_check.sh, a
    script there), transformers' Qwen3 imports once zimage_native is imported; without it, where the
    Hugging Face ``kernels`` package is installed, the root's kernels/ folder is taken for it."""
    code = "import zimage_native; import transformers.models.qwen3.modeling_qwen3; import kernels; print(kernels.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    try:
        importlib.metadata.version("kernels")  # the Hugging Face package (a transformers dependency)
    except importlib.metadata.PackageNotFoundError:
        return
    assert Path(result.stdout.strip()).resolve().parent != ROOT / "kernels"
    control = subprocess.run([sys.executable, "-c", "import transformers.models.qwen3.modeling_qwen3"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert control.returncode != 0 and "from 'kernels'" in control.stderr  # what importing zimage_native prevents
