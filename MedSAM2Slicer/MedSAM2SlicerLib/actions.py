"""What a user action returns and how it fails, and the propagation job a GUI drives off its main thread.

Only the project's typed errors (and running out of memory) become the one `MedSAM2ActionError` whose text is the
sentence to show; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import numpy as np

from . import geometry


class MedSAM2ActionError(Exception):
    """A user action that could not be completed; `str(error)` is the message for the user."""

    def __init__(self, message: str, slices_written: int = 0):
        super().__init__(message)
        self.slices_written = slices_written


@dataclasses.dataclass
class PromptOutcome:
    slice_index: int
    axis: int
    voxels: int  # voxels of the segment on that slice after the prompt
    axis_warning: str | None
    slice_range: tuple[int, int] | None = None  # a 3D box's: the slices propagation is limited to


@dataclasses.dataclass
class UncertainSlice:
    slice_index: int
    iou: float  # the model's predicted IoU, lowest first
    center_ras: np.ndarray  # the slice centre, to jump a view there


@dataclasses.dataclass
class PropagationOutcome:
    slices_written: int
    write_count: int  # region-limited writes made (a few per propagation, not one per slice)
    voxels_written: int  # voxels those writes covered
    cancelled: bool
    least_certain: list[UncertainSlice]
    edits_taken: dict = dataclasses.field(default_factory=dict)  # segment id -> slices taken as corrections
    segments: dict = dataclasses.field(default_factory=dict)  # segment id -> slices written (multi-segment)

    def status(self) -> str:
        """The status line: how much was written, and which of the user's edits were taken as corrections."""
        parts = [("Cancelled; " if self.cancelled else "") + f"{self.slices_written} slices."]
        for segment_id, slices in self.edits_taken.items():
            if slices:
                where = ", ".join(str(k) for k in slices)
                parts.append(f"Your edits on slice{'s' if len(slices) > 1 else ''} {where}"
                             + (f" of {segment_id}" if len(self.edits_taken) > 1 else "")
                             + " were taken as corrections.")
        return " ".join(parts)


def user_errors() -> tuple[type, ...]:
    """The project's typed errors: each carries a sentence for the user (an engine is optional on this side)."""
    from medsam2_client.errors import MedSAM2Error
    from medsam2_client.wire import WireFormatError

    from .local_backend import LocalServerError

    types = [geometry.GeometryError, MedSAM2Error, WireFormatError, LocalServerError]
    try:
        from medsam2_backend.engine.errors import EngineInputError
    except ImportError:  # a Slicer that only talks to a remote server has no engine
        pass
    else:
        types.append(EngineInputError)
    return tuple(types)


OUT_OF_MEMORY = ("the backend ran out of memory; limit the slice range, choose bf16, or use a computer with more "
                 "(GPU) memory")


def out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's OutOfMemoryError (recognised by name: this side never imports torch)."""
    return isinstance(exc, MemoryError) or any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__)


@contextlib.contextmanager
def as_action_error(what: str, written: Callable[[], int] = lambda: 0):
    """Turn the project's typed errors (and out-of-memory) into the one error type the GUI and console show;
    anything else is a bug and propagates with its traceback."""
    try:
        yield
    except MedSAM2ActionError:
        raise
    except Exception as exc:  # re-raised typed, with the cause chained: never swallowed
        if not (out_of_memory(exc) or isinstance(exc, user_errors())):
            raise
        n = written()
        kept = f" The {n} slice(s) written before the error stay; Undo removes them in one step." if n else ""
        reason = OUT_OF_MEMORY if out_of_memory(exc) else (str(exc).rstrip(".") or type(exc).__name__)
        raise MedSAM2ActionError(f"{what} failed: {reason}.{kept}", n) from exc


END = object()  # sent into a propagation's steps when its current backend run has no more results


class PropagationJob:
    """A started propagation, split so a GUI can read the backend off its main thread (see `begin_propagation`).

    Iterate `job.run` anywhere (it only reads from the backend); call `apply(result)` for each result, then
    `finish()`, on the main thread (MRML writes). `finish()` returns None when another backend run follows (segments
    on another axis): iterate the new `job.run` the same way. `failure(error)` ends the job with the sentence to show.
    """

    def __init__(self, steps):
        self._steps = steps
        self.run = next(steps)  # the first run; everything before it (undo state, edits) ran here, on this thread

    def apply(self, result) -> None:
        self._steps.send(result)

    def finish(self) -> PropagationOutcome | None:
        try:
            self.run = self._steps.send(END)
        except StopIteration as stop:
            return stop.value
        return None

    def failure(self, error: BaseException) -> MedSAM2ActionError:
        """The action error for `error` (raised by the backend or a write), after writing what already arrived.
        An error that is not one of the project's typed errors is a bug: it propagates with its traceback."""
        try:
            self._steps.throw(error)
        except MedSAM2ActionError as action_error:
            return action_error
        raise RuntimeError("a propagation went on after an error")  # unreachable: the steps re-raise it


def drive(steps) -> PropagationOutcome:
    """Run a propagation's steps to the end on this thread (the console's synchronous path)."""
    job = PropagationJob(steps)
    while True:
        try:
            for result in job.run:
                job.apply(result)
        except Exception as error:  # the backend failed: the steps turn it into the sentence (or re-raise a bug)
            raise job.failure(error) from error
        outcome = job.finish()
        if outcome is not None:
            return outcome
