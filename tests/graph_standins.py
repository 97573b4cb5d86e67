"""CPU stand-ins for CUDA-graph capture (the ``capture=`` / ``new_event=`` hooks of GraphedSampler).

``FakeGraphs`` re-runs the captured Python function on replay; ``FrozenGraphs`` replays what was
recorded, not the Python code, which is what a CUDA graph does.

A CUDA graph records the kernels one run launched, with their arguments: on replay, Python does not
run, so every Python number the captured code used (a guidance value, a control scale, a step's
time) is frozen at its captured value, and only the graph's input tensors, updated in place,
change the result. A stand-in that re-runs the Python function on replay (tests/test_compiled.py's
``FakeGraphs``) cannot see a value that should have been a copied-in tensor but was read as a
Python number; this one can.

``FrozenGraphs.capture(fn)`` runs ``fn`` once under a dispatch mode that records every ATen call
with its arguments. ``replay()`` calls the recorded ops again, in order, on the same tensor objects:
an op that writes its arguments (``add_``, ``copy_``, ``out=``) runs again as is; a view op
(``view``, ``slice``, ``expand``, ...) is skipped, since its result already aliases the tensor it
views, as device memory does in a graph; every other op runs again and its results are copied into
the tensors it returned at capture time, so their addresses stay fixed.

Capture also refuses what a real capture refuses: reading a tensor's value on the host
(``.item()``, ``bool(t)``, ``nonzero``, ...) and building a tensor from host data
(``torch.tensor([...])``, which on a GPU is a host-to-device copy).

Dynamo does not compile under the recording dispatch mode: it skips a compiled function it meets
there and marks that code object skipped for the rest of the process (torch 2.13: a skip applies
to the code, not the frame). The compiled blocks of every pipeline share one code object, so after
a capture of ``compile="blocks"`` code every later pipeline's blocks ran eagerly, compiling nothing,
until ``torch._dynamo.reset()``: a later test in the same process that compiles without resetting
first checked eager blocks. tests/conftest.py calls :func:`forget_dynamo_skips` after each test.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from zimage_native.accel.cuda_graphs import Captured

#: ATen ops that read device values on the host (a synchronisation: illegal during capture).
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "_unique2", "unique_dim",
              "unique_consecutive", "item"}
#: ATen ops that turn host data into a tensor (on a GPU: a host-to-device copy, illegal during capture).
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}


_captures = 0  # recording captures run since the last forget_dynamo_skips()


def forget_dynamo_skips() -> bool:
    """``torch._dynamo.reset()`` if a capture ran under the recording dispatch mode since the last
    call (dropping the code objects dynamo marked skipped there, see the module doc); True if so."""
    global _captures
    if not _captures:
        return False
    _captures = 0
    import torch._dynamo

    torch._dynamo.reset()
    return True


class CaptureError(RuntimeError):
    """The captured code did something a CUDA graph capture does not allow."""


def _kind(func) -> str:
    """'mutates' (writes an argument or returns nothing), 'view' (aliases an argument), or 'fresh'."""
    returns = func._schema.returns
    if not returns:
        return "mutates"
    if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        return "mutates"
    if any(r.alias_info is not None for r in returns):
        return "view"
    return "fresh"


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.tape: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in HOST_READS:
            raise CaptureError(f"{func} reads a device value on the host during capture")
        if name in HOST_DATA:
            raise CaptureError(f"{func} builds a tensor from host data during capture (a host-to-device copy)")
        out = func(*args, **kwargs)
        kind = _kind(func)
        if kind != "view":
            self.tape.append((func, args, kwargs, out, kind))
        return out


class FakeGraphs:
    """'replay' re-runs the captured function on the static inputs; releases and an event log
    (record / wait) are recorded."""

    def __init__(self):
        self.released = 0
        self.log: list[str] = []

    def capture(self, fn):
        out = fn()

        def replay():
            self.log.append("replay")
            out.copy_(fn())

        def release():
            self.released += 1

        return Captured(out, replay, release)

    def event(self):
        log = self.log

        class Event:
            def record(self):
                log.append("record")

            def synchronize(self):
                log.append("wait")

        return Event()


class FrozenGraphs(FakeGraphs):
    """'replay' runs the ops recorded at capture with the values they had (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.ops = 0  # ops on the tapes captured so far

    def capture(self, fn):
        global _captures
        fn()  # warm-up, as cuda_capture does (outside the capture)
        recorder = _Recorder()
        _captures += 1
        with recorder:
            out = fn()
        tape = recorder.tape
        self.ops += len(tape)

        def replay():
            self.log.append("replay")
            for func, args, kwargs, recorded, kind in tape:
                result = func(*args, **kwargs)
                if kind == "fresh":
                    new, _ = tree_flatten(result)
                    old, _ = tree_flatten(recorded)
                    for dst, src in zip(old, new):
                        if isinstance(dst, torch.Tensor):
                            dst.copy_(src)

        def release():
            self.released += 1
            tape.clear()

        return Captured(out, replay, release)
