"""Objects holding what belongs to this process only (compiled functions, streaming hooks).

``copy.deepcopy`` copies them as it copies any object (a copy runs in the same process); pickling
(``pickle``, ``torch.save`` of a module) is refused with what to do instead: PyTorch's own error
named a function or a lambda deep inside ("Can't pickle <function _block_forward ...>: it's not
the same object as zimage_native.accel.compile._block_forward").
"""

from __future__ import annotations

import copy


class ProcessLocal:
    """A mixin: ``pickle_refusal`` is the message of the TypeError that pickling raises."""

    pickle_refusal = "this object belongs to this process and cannot be pickled"

    def __reduce_ex__(self, protocol):
        raise TypeError(self.pickle_refusal)

    def __copy__(self):
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict):
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        return copied
