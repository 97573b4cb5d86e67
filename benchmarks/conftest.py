"""pytest setup for benchmarks/: the fix of tests/conftest.py for the repository's ``kernels/`` folder.

``python -m pytest benchmarks/...`` puts the repository root on sys.path, where ``kernels/`` (installed
as ``zimage_native.kernels``) would hide the Hugging Face ``kernels`` package that transformers
imports; tests/conftest.py imports the installed one first when it is itself imported.
"""

try:
    import tests.conftest  # noqa: F401  (its import does the fix)
except ImportError:  # the root is not on sys.path: nothing is hidden
    pass
