"""Kept for imports: the recorder is :mod:`vramplan._engine.tape`, the replay :mod:`vramplan._engine.replay`."""

from ._engine.replay import Pass
from ._engine.tape import ZERO, Moment, Tape, Tensor, kinds_dict

__all__ = ["ZERO", "Moment", "Pass", "Tape", "Tensor", "kinds_dict"]
