"""The session controller: one user action (a prompt, a propagation) from RAS input to voxels in a segment.

The backend is duck-typed: anything with `open_session(volume_kji, spacing_kji, axis, preprocessing, fingerprint)`
returning a session with the engine's `add_prompt` / `propagate` / `set_preprocessing` / `reset_object` / `close`
(the in-process engine adapter in `logic.py`, or the network client's `RemoteSession`).

Decisions:
- One backend session per (volume node, propagation axis). A volume whose voxels are unchanged (same fingerprint)
  is never uploaded/opened again; a changed volume opens a new session and forgets that session's prompts.
- Each segment is its own object id on the session. A prompt for a segment in a view along another axis starts
  the segment over on that axis (the old object is reset).
- A changed preprocessing is applied to open sessions with `set_preprocessing` (prompts are kept, no re-open).
- Errors from the backend or geometry become one `MedSAM2ActionError` whose text is the sentence to show. Slices
  written before a propagation failed stay in the segment, and Undo removes them in one step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import numpy as np

from . import geometry, volume_settings
from .mrml_io import SliceBatchWriter


class MedSAM2ActionError(Exception):
    """A user action that could not be completed; `str(error)` is the message for the user."""

    def __init__(self, message: str, slices_written: int = 0):
        super().__init__(message)
        self.slices_written = slices_written


@dataclasses.dataclass(frozen=True)
class RasPrompt:
    """A prompt as the user placed it (world RAS), kept per segment so the panel can list and re-show it."""

    slice_index: int
    axis: int
    points_ras: np.ndarray | None = None  # (N, 3)
    labels: np.ndarray | None = None  # (N,), 1 positive, 0 negative
    box_corners_ras: np.ndarray | None = None  # (2 or 8, 3)


@dataclasses.dataclass
class PromptOutcome:
    slice_index: int
    axis: int
    voxels: int  # voxels of the segment on that slice after the prompt
    axis_warning: str | None


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


@dataclasses.dataclass
class PropagationJob:
    """See `SessionController.begin_propagation`."""

    controller: "SessionController"
    volume_node: object
    writer: SliceBatchWriter
    run: object  # the backend's propagation: iterable of slice results, with done/planned/summary/cancel()
    obj_id: int
    axis: int

    def apply(self, result) -> None:
        """Queue one slice result for writing (main thread); writes when its batch is due."""
        self.writer.add(result.slice_index, result.mask)

    def finish(self) -> PropagationOutcome:
        """Write what is pending and report; ends the job."""
        self.controller._run = None
        with _as_action_error("Propagation", lambda: self.controller._flush_and_count(self.writer)):
            self.writer.flush()
        writer, axis, volume_node = self.writer, self.axis, self.volume_node
        ijk_to_ras = geometry.ijk_to_world_ras(volume_node)
        ranked = self.run.summary.least_certain.get(self.obj_id, [])
        return PropagationOutcome(len(writer.slices_written), writer.write_count, writer.voxels_written,
                                  bool(self.run.summary.cancelled),
                                  [UncertainSlice(k, iou, _slice_center_ras(ijk_to_ras, volume_node, axis, k))
                                   for k, iou in ranked])

    def failure(self, error: BaseException) -> MedSAM2ActionError:
        """The error to show for `error` (raised by the backend or a write); what already arrived is written
        first. Ends the job."""
        self.controller._run = None
        try:
            with _as_action_error("Propagation", lambda: self.controller._flush_and_count(self.writer)):
                raise error
        except MedSAM2ActionError as action_error:
            return action_error


@dataclasses.dataclass
class _OpenSession:
    fingerprint: str
    axis: int
    session: object
    preprocessing: object
    next_obj_id: int = 1
    obj_ids: dict = dataclasses.field(default_factory=dict)  # segment id -> object id


@contextlib.contextmanager
def _as_action_error(what: str, written: Callable[[], int] = lambda: 0):
    """Turn whatever the backend or geometry raised into the one error type the GUI and console show."""
    try:
        yield
    except MedSAM2ActionError:
        raise
    except Exception as exc:  # re-raised typed, with the cause chained: never swallowed
        n = written()
        kept = f" The {n} slice(s) written before the error stay; Undo removes them in one step." if n else ""
        reason = str(exc).rstrip(".") or type(exc).__name__
        raise MedSAM2ActionError(f"{what} failed: {reason}.{kept}", n) from exc


class SessionController:
    """Holds the backend sessions and per-segment prompts; converts RAS prompts and writes results."""

    def __init__(self, backend, preprocessing=None):
        self.backend = backend
        self.preprocessing = preprocessing
        self._sessions: dict[tuple[str, int], _OpenSession] = {}
        self._segment_axis: dict[tuple[str, str], int] = {}  # (volume id, segment id) -> axis of its object
        self._prompts: dict[tuple[str, str], list[RasPrompt]] = {}
        self._fingerprints: dict[str, tuple[int, str]] = {}  # volume id -> (image MTime, fingerprint)
        self._run = None
        # (volume id, segment id) -> the options of its last completed propagation (removing a prompt redoes it)
        self.last_propagation: dict[tuple[str, str], dict] = {}

    # ---- user actions -----------------------------------------------------------------------------------------
    def add_prompt(self, volume_node, target, segment_id: str, *, points_ras=None, labels=None,
                   box_corners_ras=None, slice_to_ras=None) -> PromptOutcome:
        """Place points and/or a box (RAS) for a segment on the view `slice_to_ras`; writes that slice at once."""
        if points_ras is None and box_corners_ras is None:
            raise MedSAM2ActionError("A prompt needs at least one point or a box.")
        with _as_action_error("Placing the prompt"):
            ijk_to_ras = geometry.ijk_to_world_ras(volume_node)
            choice = geometry.choose_propagation_axis(ijk_to_ras, geometry.view_slice_to_ras(
                "axial" if slice_to_ras is None else slice_to_ras))
            entry = self._session_for(volume_node, choice.axis)
            shape = _shape_kji(volume_node)
            kwargs, slice_index = {}, None
            if box_corners_ras is not None:
                slice_index, kwargs["box"] = geometry.ras_box_to_slice_box(
                    np.asarray(box_corners_ras, float), ijk_to_ras, choice.axis, shape)
            if points_ras is not None:
                point_slice, kwargs["points"] = geometry.ras_to_slice_pixels(
                    np.asarray(points_ras, float), ijk_to_ras, choice.axis, shape)
                kwargs["labels"] = np.asarray(labels if labels is not None else [1] * len(kwargs["points"]))
                if slice_index is not None and point_slice != slice_index:
                    raise MedSAM2ActionError(f"The box is on slice {slice_index} and the points on slice "
                                             f"{point_slice}; place them on the same slice.")
                slice_index = point_slice
            obj_id = self._object_for(volume_node, entry, segment_id)
            result = entry.session.add_prompt(obj_id, slice_index, **kwargs)
            writer = self._writer(volume_node, target, segment_id, choice.axis)
            writer.add(result.slice_index, result.mask)
            writer.flush()
        self._prompts.setdefault((volume_node.GetID(), segment_id), []).append(RasPrompt(
            slice_index, choice.axis,
            None if points_ras is None else np.asarray(points_ras, float),
            None if points_ras is None else kwargs["labels"],
            None if box_corners_ras is None else np.asarray(box_corners_ras, float)))
        return PromptOutcome(slice_index, choice.axis, int(np.count_nonzero(result.mask)), choice.warning)

    def propagate(self, volume_node, target, segment_id: str, *, direction: str = "both", start=None, stop=None,
                  stop_after_empty=None, postprocess: Sequence[str] = (),
                  progress: Callable[[int, int], None] | None = None) -> PropagationOutcome:
        """Propagate a segment's prompts through the volume, streaming slices into the segment (one undo step).

        `progress(done, planned)` is called after each slice; `cancel()` (e.g. from that callback) stops between
        slices, keeping what was written.
        """
        job = self.begin_propagation(volume_node, target, segment_id, direction=direction, start=start, stop=stop,
                                     stop_after_empty=stop_after_empty, postprocess=postprocess)
        try:
            for result in job.run:
                job.apply(result)
                if progress is not None:
                    progress(job.run.done, job.run.planned)
        except Exception as error:
            raise job.failure(error)  # chained to `error` inside failure()
        return job.finish()

    def begin_propagation(self, volume_node, target, segment_id: str, *, direction: str = "both", start=None,
                          stop=None, stop_after_empty=None, postprocess: Sequence[str] = ()) -> PropagationJob:
        """A started propagation split in three, so a GUI can read the backend off its main thread: iterate
        `job.run` anywhere (it only reads from the backend), `job.apply` each result on the main thread (MRML
        writes), then `job.finish()` (or `job.failure(error)`). `propagate` is these steps in one loop."""
        axis = self._segment_axis.get((volume_node.GetID(), segment_id))
        if axis is None:
            raise MedSAM2ActionError("Place a point or a box for this segment before propagating.")
        writer = self._writer(volume_node, target, segment_id, axis)
        with _as_action_error("Propagation"):
            entry = self._session_for(volume_node, axis)
            obj_id = entry.obj_ids.get(segment_id)
            if obj_id is None:  # the volume changed since the prompt: its session is gone
                raise MedSAM2ActionError("The volume changed since the last prompt; place a prompt again.")
            run = entry.session.propagate([obj_id], direction=direction, start=start, stop=stop,
                                          stop_after_empty=stop_after_empty, postprocess=tuple(postprocess))
        self._run = run
        self.last_propagation[(volume_node.GetID(), segment_id)] = dict(
            direction=direction, start=start, stop=stop, stop_after_empty=stop_after_empty,
            postprocess=tuple(postprocess))
        return PropagationJob(self, volume_node, writer, run, obj_id, axis)

    def cancel(self) -> None:
        """Stop the running propagation between two slices (safe to call from its progress callback)."""
        if self._run is not None:
            self._run.cancel()

    def set_preprocessing(self, preprocessing) -> None:
        """Use this intensity preprocessing from the next action on (open sessions keep their prompts)."""
        self.preprocessing = preprocessing

    def prompts(self, volume_node, segment_id: str) -> list[RasPrompt]:
        return list(self._prompts.get((volume_node.GetID(), segment_id), []))

    def reset_segment(self, volume_node, segment_id: str) -> None:
        """Forget a segment's prompts and object (its voxels stay: they are the user's to erase or undo)."""
        key = (volume_node.GetID(), segment_id)
        axis = self._segment_axis.pop(key, None)
        self._prompts.pop(key, None)
        self.last_propagation.pop(key, None)
        entry = self._sessions.get((volume_node.GetID(), axis))
        if entry is not None and segment_id in entry.obj_ids:
            with _as_action_error("Resetting the segment"):
                entry.session.reset_object(entry.obj_ids.pop(segment_id))

    def close(self) -> None:
        """Close every backend session (frees server memory): all are tried, the first failure is raised after."""
        sessions, self._sessions = self._sessions, {}
        self._segment_axis.clear()
        self._prompts.clear()
        failure = None
        for entry in sessions.values():
            try:
                with _as_action_error("Closing the session"):
                    entry.session.close()
            except MedSAM2ActionError as error:
                failure = failure or error
        if failure is not None:
            raise failure

    def session_opener(self, volume_node, slice_to_ras=None, upload_progress=None) -> Callable[[], None] | None:
        """The slow part of a first prompt on a volume (upload and open), for a GUI to run on a worker thread.

        None when the session for the view's axis is open already; else a callable that touches no MRML (the
        voxels are copied here, on the main thread) and opens it, so that `add_prompt` then finds it open.
        `upload_progress(fraction)` is passed to a backend whose `open_session` takes it (the network client of a
        newer release may; checked, not assumed), and is called on the worker thread.
        """
        import inspect

        with _as_action_error("Opening the volume"):
            axis = geometry.choose_propagation_axis(geometry.ijk_to_world_ras(volume_node), geometry.view_slice_to_ras(
                "axial" if slice_to_ras is None else slice_to_ras)).axis
            key, fingerprint = (volume_node.GetID(), axis), self.fingerprint(volume_node)
            entry = self._sessions.get(key)
            if entry is not None and entry.fingerprint == fingerprint:
                return None
            if entry is not None:
                self._drop_session(volume_node, key)
            volume, spacing = geometry.volume_array_kji(volume_node), geometry.spacing_kji(volume_node)
            preprocessing = volume_settings.preprocessing_for(volume_node, self.preprocessing)
        extra = {}
        if upload_progress is not None and "upload_progress" in inspect.signature(
                self.backend.open_session).parameters:
            extra["upload_progress"] = upload_progress

        def open_session():
            with _as_action_error("Sending the volume"):
                session = self.backend.open_session(volume, spacing, axis, preprocessing, fingerprint=fingerprint,
                                                    **extra)
            # A plain dict entry (no MRML): the GUI holds its one-action guard meanwhile, nothing else opens.
            self._sessions[key] = _OpenSession(fingerprint, axis, session, preprocessing)
        return open_session

    def forget_volume(self, volume_id: str | None = None) -> None:
        """Drop what is known of a volume (every volume when None): its sessions (closed), prompts, fingerprint.

        For a node that left the scene: MRML reuses node ids after Close Scene, so a volume loaded later under the
        same id must not inherit these. All sessions are tried; the first failure to close is raised after.
        """
        def gone(key):
            return volume_id is None or key[0] == volume_id

        for table in (self._segment_axis, self._prompts, self._fingerprints):
            for key in [k for k in table if gone((k,) if isinstance(k, str) else k)]:
                del table[key]
        sessions = [self._sessions.pop(key) for key in [k for k in self._sessions if gone(k)]]
        failure = None
        for entry in sessions:
            try:
                with _as_action_error("Closing the session"):
                    entry.session.close()
            except MedSAM2ActionError as error:
                failure = failure or error
        if failure is not None:
            raise failure

    # ---- helpers ----------------------------------------------------------------------------------------------
    def fingerprint(self, volume_node) -> str:
        """The wire format's identity of the voxels (what the server knows volumes by), recomputed only when the
        image data was modified; the backend then needs no hash of its own to skip an upload."""
        import slicer.util
        from medsam2_client import wire

        mtime = volume_node.GetImageData().GetMTime()
        cached = self._fingerprints.get(volume_node.GetID())
        if cached is not None and cached[0] == mtime:
            return cached[1]
        digest = wire.fingerprint(slicer.util.arrayFromVolume(volume_node))
        self._fingerprints[volume_node.GetID()] = (mtime, digest)
        return digest

    def _session_for(self, volume_node, axis: int) -> _OpenSession:
        key = (volume_node.GetID(), axis)
        fingerprint = self.fingerprint(volume_node)
        entry = self._sessions.get(key)
        if entry is not None and entry.fingerprint != fingerprint:
            self._drop_session(volume_node, key)
            entry = None
        preprocessing = volume_settings.preprocessing_for(volume_node, self.preprocessing)  # its own, else ours
        if entry is None:
            session = self.backend.open_session(geometry.volume_array_kji(volume_node),
                                                geometry.spacing_kji(volume_node), axis, preprocessing,
                                                fingerprint=fingerprint)
            entry = self._sessions[key] = _OpenSession(fingerprint, axis, session, preprocessing)
        elif entry.preprocessing != preprocessing:
            entry.session.set_preprocessing(preprocessing)
            entry.preprocessing = preprocessing
        return entry

    def _drop_session(self, volume_node, key) -> None:
        entry = self._sessions.pop(key)
        for segment_id in entry.obj_ids:
            self._segment_axis.pop((volume_node.GetID(), segment_id), None)
            self._prompts.pop((volume_node.GetID(), segment_id), None)
        entry.session.close()

    def _object_for(self, volume_node, entry: _OpenSession, segment_id: str) -> int:
        """The segment's object id on this session; a segment that moves to another axis starts over there."""
        key = (volume_node.GetID(), segment_id)
        previous_axis = self._segment_axis.get(key)
        if previous_axis is not None and previous_axis != entry.axis:
            old = self._sessions.get((volume_node.GetID(), previous_axis))
            if old is not None and segment_id in old.obj_ids:
                old.session.reset_object(old.obj_ids.pop(segment_id))
            self._prompts.pop(key, None)
        self._segment_axis[key] = entry.axis
        if segment_id not in entry.obj_ids:
            entry.obj_ids[segment_id] = entry.next_obj_id
            entry.next_obj_id += 1
        return entry.obj_ids[segment_id]

    @staticmethod
    def _writer(volume_node, target, segment_id: str, axis: int) -> SliceBatchWriter:
        ijk_to_local = geometry.ijk_to_node_local(volume_node, target.segmentation_node)
        return SliceBatchWriter(target, segment_id, ijk_to_local, _shape_kji(volume_node), axis)

    @staticmethod
    def _flush_and_count(writer: SliceBatchWriter) -> int:
        """On an error, still write what already arrived, so the segment shows everything the backend sent."""
        writer.flush()
        return len(writer.slices_written)


def _shape_kji(volume_node) -> tuple[int, int, int]:
    return tuple(reversed(volume_node.GetImageData().GetDimensions()))


def _slice_center_ras(ijk_to_ras: np.ndarray, volume_node, axis: int, slice_index: int) -> np.ndarray:
    center_kji = (np.array(_shape_kji(volume_node), float) - 1) / 2
    center_kji[axis] = slice_index
    return geometry.ijk_to_ras(center_kji[::-1], ijk_to_ras)[0]
