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
- Errors from the backend or geometry become one `MedSAM2ActionError` whose text is the sentence to show
  (`actions`). Slices written before a propagation failed stay in the segment, and Undo removes them in one step.
- Every action is one undo step, and the model follows undo and redo (see `segment_states`): before each action,
  each segment's tag names the state it is in, and an engine object that is not in that state is rebuilt by
  replaying that state's prompts and propagations. Slices the user edited since MedSAM2 last wrote them become
  mask corrections when the segment is propagated again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Callable, Sequence

import numpy as np

from . import geometry, segment_states, volume_settings
from .actions import (END, MedSAM2ActionError, PromptOutcome, PropagationJob, PropagationOutcome, UncertainSlice,
                      as_action_error, drive)
from .mrml_io import SliceBatchWriter, segment_mask_kji
from .segment_states import PromptCall, PropagateCall, SegmentState


@dataclasses.dataclass(frozen=True)
class RasPrompt:
    """A prompt as the user placed it (world RAS), kept per segment so the panel can list and re-show it."""

    slice_index: int
    axis: int
    points_ras: np.ndarray | None = None  # (N, 3)
    labels: np.ndarray | None = None  # (N,), 1 positive, 0 negative
    box_corners_ras: np.ndarray | None = None  # (2, 4 or 8, 3)
    source: str = "prompt"  # "prompt", "segment" (the segment's voxels on the slice) or "edit" (a user's edit)
    mask: np.ndarray | None = None  # "segment"/"edit": the slice's mask (rows, columns of the slice) given
    slice_range: tuple[int, int] | None = None  # a 3D box (an ROI): the slices propagation is limited to
    box_margin_mm: float | None = None  # the margin that range was made with (to place the box again)


@dataclasses.dataclass
class _OpenSession:
    fingerprint: str
    axis: int
    session: object
    preprocessing: object
    next_obj_id: int = 1
    obj_ids: dict = dataclasses.field(default_factory=dict)  # (segmentation id, segment id) -> object id


@dataclasses.dataclass
class _Action:
    """What one user action changed: per segment its new (axis, calls, prompts), and the writers it used."""

    changes: dict = dataclasses.field(default_factory=dict)
    writers: list = dataclasses.field(default_factory=list)
    accepted: list = dataclasses.field(default_factory=list)  # (axis, first, last) of slices taken as the user drew

    def change(self, segment_id: str, axis, calls, prompts) -> None:
        self.changes[segment_id] = (axis, tuple(calls), tuple(prompts))


REPLAY_CANCELLED = "Going back to the state Undo/Redo left was cancelled; the next action starts it again."


class SessionController:
    """Holds the backend sessions and per-segment model states; converts RAS prompts and writes results."""

    def __init__(self, backend, preprocessing=None):
        self.backend = backend
        self.preprocessing = preprocessing
        self._sessions: dict[tuple[str, int], _OpenSession] = {}
        self._book = segment_states.StateBook()
        # (segmentation id, segment id) -> the state the segment's engine object is in now
        self._live: dict[tuple[str, str], SegmentState] = {}
        self._fingerprints: dict[str, tuple[int, str]] = {}  # volume id -> (image MTime, fingerprint)
        self._voxels: dict[str, tuple[str, np.ndarray]] = {}  # volume id -> (fingerprint, its one copy)
        # The user's Cancel of the running action, set by `cancel` and cleared when an action starts: it ends a wait
        # for a busy server (a network session keeps it for its later calls) and stops a rebuild after Undo/Redo.
        self._cancelled = threading.Event()
        self._run = None
        # (volume id, segment id) -> the options of its last propagation (removing a prompt redoes it)
        self.last_propagation: dict[tuple[str, str], dict] = {}

    # ---- user actions -----------------------------------------------------------------------------------------
    def add_prompt(self, volume_node, target, segment_id: str, *, points_ras=None, labels=None,
                   box_corners_ras=None, slice_to_ras=None,
                   box_margin_mm: float = geometry.DEFAULT_BOX_MARGIN_MM) -> PromptOutcome:
        """Place points and/or a box (RAS) for a segment on the view `slice_to_ras`; writes that slice at once.

        A box whose corners span several slices along the propagation axis (an ROI's 8) is a 3D box: its centre
        slice is prompted with its outline there, and later propagations of the segment stay within its slices
        plus `box_margin_mm` (and the segment's prompted slices), unless given a range of their own."""
        if points_ras is None and box_corners_ras is None:
            raise MedSAM2ActionError("A prompt needs at least one point or a box.")
        with as_action_error("Placing the prompt"):
            ijk_to_ras = geometry.ijk_to_world_ras(volume_node)
            choice = geometry.choose_propagation_axis(ijk_to_ras, geometry.view_slice_to_ras(
                "axial" if slice_to_ras is None else slice_to_ras))
            shape = _shape_kji(volume_node)
            kwargs, slice_index, slice_range = {}, None, None
            if box_corners_ras is not None:
                plan = geometry.box_prompt_from_corners(np.asarray(box_corners_ras, float), ijk_to_ras,
                                                        choice.axis, shape, box_margin_mm)
                slice_index, kwargs["box"] = plan.slice_index, plan.box
                if (plan.first, plan.last) != (0, shape[choice.axis] - 1):
                    slice_range = (plan.first, plan.last)
            if points_ras is not None:
                point_slice, kwargs["points"] = geometry.ras_to_slice_pixels(
                    np.asarray(points_ras, float), ijk_to_ras, choice.axis, shape)
                kwargs["labels"] = np.asarray(labels if labels is not None else [1] * len(kwargs["points"]))
                if slice_index is not None and point_slice != slice_index:
                    raise MedSAM2ActionError(f"The box is on slice {slice_index} and the points on slice "
                                             f"{point_slice}; place them on the same slice.")
                slice_index = point_slice
            record = RasPrompt(slice_index, choice.axis,
                               None if points_ras is None else np.asarray(points_ras, float),
                               None if points_ras is None else kwargs["labels"],
                               None if box_corners_ras is None else np.asarray(box_corners_ras, float),
                               slice_range=slice_range,
                               box_margin_mm=None if box_corners_ras is None else float(box_margin_mm))
            result = self._prompt(volume_node, target, segment_id, choice.axis,
                                  PromptCall(slice_index, kwargs), record)
        return PromptOutcome(slice_index, choice.axis, int(np.count_nonzero(result.mask)), choice.warning,
                             slice_range)

    def prompt_from_segment(self, volume_node, target, segment_id: str, slice_to_ras=None) -> PromptOutcome:
        """Use the segment's own voxels on the slice a view shows as a mask prompt (a first prompt or a
        correction). The voxels stay as they are: they are the user's."""
        with as_action_error("Using the segment as the prompt"):
            ijk_to_ras = geometry.ijk_to_world_ras(volume_node)
            view = geometry.view_slice_to_ras("axial" if slice_to_ras is None else slice_to_ras)
            choice = geometry.choose_propagation_axis(ijk_to_ras, view)
            shape = _shape_kji(volume_node)
            slice_index = geometry.view_slice_index(view, ijk_to_ras, choice.axis, shape)
            mask = np.take(segment_mask_kji(target.segmentation_node, segment_id, volume_node), slice_index,
                           axis=choice.axis)
            live = self._tagged_state(volume_node, target, segment_id)
            if not mask.any() and (live is None or live.axis != choice.axis):
                raise MedSAM2ActionError(f"The segment has no voxels on slice {slice_index}; paint it there first, "
                                         "or place a point or a box.")
        self.add_mask_prompt(volume_node, target, segment_id, choice.axis, slice_index, mask)
        return PromptOutcome(slice_index, choice.axis, int(np.count_nonzero(mask)), choice.warning)

    def add_mask_prompt(self, volume_node, target, segment_id: str, axis: int, slice_index: int, mask,
                        source: str = "segment") -> None:
        """Give the model a slice mask as it is (the user's voxels: they are not written), e.g. to place a
        "Use segment as prompt" or an edit again when another prompt is removed."""
        with as_action_error("Using the segment as the prompt"):
            mask = np.asarray(mask, bool)
            self._prompt(volume_node, target, segment_id, axis, PromptCall(slice_index, {"mask": mask}, source),
                         RasPrompt(slice_index, axis, source=source, mask=mask), write=False)

    def propagate(self, volume_node, target, segment_id: str, *, direction: str = "both", start=None, stop=None,
                  stop_after_empty=None, postprocess: Sequence[str] = (),
                  progress: Callable[[int, int], None] | None = None) -> PropagationOutcome:
        """Propagate a segment's prompts through the volume, streaming slices into the segment (one undo step).

        Slices the user edited since MedSAM2 last wrote them are first given to the model as mask corrections
        (`edits_taken`), and are not overwritten. `progress(done, planned)` is called after each slice;
        `cancel()` (e.g. from that callback) stops between slices, keeping what was written.
        """
        return self.propagate_segments(volume_node, target, [segment_id], direction=direction, start=start,
                                       stop=stop, stop_after_empty=stop_after_empty, postprocess=postprocess,
                                       progress=progress)

    def propagated_segments(self, volume_node, target) -> list[str]:
        """The segmentation's segments that have MedSAM2 prompts on this volume (in the segmentation's order)."""
        self._sync(volume_node, target)
        node = target.segmentation_node
        return [s for s in _segment_ids(node) if (live := self._live.get((node.GetID(), s))) is not None
                and live.axis is not None and live.volume_id == volume_node.GetID()]

    def propagate_segments(self, volume_node, target, segment_ids: Sequence[str], *, direction: str = "both",
                           start=None, stop=None, stop_after_empty=None, postprocess: Sequence[str] = (),
                           progress: Callable[[int, int], None] | None = None) -> PropagationOutcome:
        """Propagate several segments together: one engine propagation per axis (each slice encoded once for all
        of them), one writer, one undo step. Options as `propagate`."""
        return drive(self._propagation_steps(volume_node, target, segment_ids, dict(
            direction=direction, start=start, stop=stop, stop_after_empty=stop_after_empty,
            postprocess=tuple(postprocess)), progress))

    def begin_propagation(self, volume_node, target, segment_ids: Sequence[str], *, direction: str = "both",
                          start=None, stop=None, stop_after_empty=None, postprocess: Sequence[str] = ()
                          ) -> PropagationJob:
        """`propagate_segments` as a `PropagationJob`, for a GUI that reads the backend on a worker thread."""
        return PropagationJob(self._propagation_steps(volume_node, target, segment_ids, dict(
            direction=direction, start=start, stop=stop, stop_after_empty=stop_after_empty,
            postprocess=tuple(postprocess)), None))

    def _propagation_steps(self, volume_node, target, segment_ids: Sequence[str], options: dict, progress):
        """The one propagation path, as a generator: it yields each backend run, is sent that run's results one
        by one (then `END`), writes them, and returns the outcome. Whoever drives it decides where runs are read."""
        writers: list[SliceBatchWriter] = []
        with as_action_error("Propagation", lambda: sum(len(w.slices_written) for w in writers)):
            with self._action(volume_node, target) as action:
                writers = action.writers
                groups = self._group_runs(volume_node, target, segment_ids, options)
                for segment_id in segment_ids:
                    self.last_propagation[(volume_node.GetID(), segment_id)] = dict(options)
                edits, ranked, cancelled, done_before, planned_before = {}, {}, False, 0, 0
                for (axis, start, stop), segments in groups.items():
                    entry = self._session_for(volume_node, axis)
                    by_obj = {}
                    for segment_id in segments:
                        obj_id = entry.obj_ids.get((target.segmentation_node.GetID(), segment_id))
                        if obj_id is None:  # the volume changed since the prompt: its session is gone
                            raise MedSAM2ActionError("The volume changed since the last prompt; place a prompt "
                                                     "again.")
                        by_obj[obj_id] = segment_id
                        edits[segment_id] = self._take_edits(volume_node, target, entry, segment_id, obj_id,
                                                             action)
                    writer = self._writer(volume_node, target, None, axis)
                    action.writers.append(writer)
                    run_options = dict(options, start=start, stop=stop)
                    run = entry.session.propagate(list(by_obj), **run_options)
                    self._run = run
                    read = dict.fromkeys(by_obj, 0)
                    try:
                        while (result := (yield run)) is not END:
                            read[result.obj_id] += 1
                            segment_id = by_obj[result.obj_id]
                            if result.slice_index not in edits[segment_id]:  # the user's edits stay as drawn
                                writer.add(result.slice_index, result.mask, segment_id)
                            if progress is not None:
                                progress(done_before + run.done, planned_before + run.planned)
                    finally:
                        self._run = None
                    writer.flush()
                    for obj_id, segment_id in by_obj.items():  # the model's memory now includes this run
                        self._record_call(target, action, segment_id, PropagateCall(
                            run_options, read[obj_id] if run.summary.cancelled else None))
                    done_before, planned_before = done_before + run.done, planned_before + run.planned
                    ijk_to_ras = geometry.ijk_to_world_ras(volume_node)
                    for obj_id, segment_id in by_obj.items():
                        ranked[segment_id] = [
                            UncertainSlice(k, iou, _slice_center_ras(ijk_to_ras, volume_node, axis, k))
                            for k, iou in run.summary.least_certain.get(obj_id, [])]
                    if run.summary.cancelled:
                        cancelled = True
                        break
        least_certain = sorted((u for slices in ranked.values() for u in slices), key=lambda u: u.iou)[:5]
        return PropagationOutcome(
            len(set().union(*(w.slices_written for w in writers))), sum(w.write_count for w in writers),
            sum(w.voxels_written for w in writers), cancelled, least_certain,
            edits_taken={s: sorted(k) for s, k in edits.items()},
            segments={s: sorted(set().union(*(w.written_by_segment.get(s, set()) for w in writers)))
                      for s in segment_ids})

    def cancel(self) -> None:
        """Stop the running propagation between two slices (safe to call from its progress callback), or end a
        session opener's wait for a busy server."""
        if self._run is not None:
            self._run.cancel()
        self._cancelled.set()

    def set_preprocessing(self, preprocessing) -> None:
        """Use this intensity preprocessing from the next action on (open sessions keep their prompts)."""
        self.preprocessing = preprocessing

    def prompts(self, volume_node, segment_id: str, target=None) -> list[RasPrompt]:
        """A segment's prompts as placed (of the segmentation `target` writes to; without it, of any)."""
        if target is not None:
            state = self._tagged_state(volume_node, target, segment_id)
            return list(state.prompts) if state is not None and state.axis is not None else []
        for (_, seg), live in self._live.items():
            if seg == segment_id and live.volume_id == volume_node.GetID() and live.axis is not None:
                return list(live.prompts)
        return []

    def reset_segment(self, volume_node, target, segment_id: str) -> None:
        """Forget a segment's prompts and object (its voxels stay: they are the user's to erase or undo).
        One undo step: Undo brings the prompts back."""
        with as_action_error("Resetting the segment"):
            with self._action(volume_node, target) as action:
                live = self._live.get((target.segmentation_node.GetID(), segment_id))
                if live is not None:
                    self._drop_object((target.segmentation_node.GetID(), segment_id), live)
                action.change(segment_id, None, (), ())
        self.last_propagation.pop((volume_node.GetID(), segment_id), None)

    def close(self) -> None:
        """Close every backend session (frees server memory): all are tried, the first failure is raised after."""
        self.forget_volume(None)
        self._book.clear()

    def session_opener(self, volume_node, slice_to_ras=None, upload_progress=None) -> Callable[[], None] | None:
        """The slow part of a first prompt on a volume (upload and open), for a GUI to run on a worker thread.

        None when the session for the view's axis is open already; else a callable that touches no MRML (the
        voxels are copied here, on the main thread) and opens it, so that `add_prompt` then finds it open.
        `upload_progress(fraction)` is passed to a backend whose `open_session` takes it (the network client
        does; the in-process adapter may not: checked, not assumed), and is called on the worker thread; so is a
        `cancel` event, which `cancel()` sets to end a wait for a busy server.
        """
        import inspect

        with as_action_error("Opening the volume"):
            axis = geometry.choose_propagation_axis(geometry.ijk_to_world_ras(volume_node), geometry.view_slice_to_ras(
                "axial" if slice_to_ras is None else slice_to_ras)).axis
            key, fingerprint = (volume_node.GetID(), axis), self.fingerprint(volume_node)
            entry = self._sessions.get(key)
            if entry is not None and entry.fingerprint == fingerprint:
                return None
            if entry is not None:
                self._drop_session(key)
            volume, spacing = self._voxels_of(volume_node, fingerprint), geometry.spacing_kji(volume_node)
            preprocessing = volume_settings.preprocessing_for(volume_node, self.preprocessing)
        extra, accepted = {}, inspect.signature(self.backend.open_session).parameters
        if upload_progress is not None and "upload_progress" in accepted:
            extra["upload_progress"] = upload_progress
        if "cancel" in accepted:
            self._cancelled.clear()
            extra["cancel"] = self._cancelled

        def open_session():
            with as_action_error("Sending the volume"):
                session = self.backend.open_session(volume, spacing, axis, preprocessing, fingerprint=fingerprint,
                                                    **extra)
            # A plain dict entry (no MRML): the GUI holds its one-action guard meanwhile, nothing else opens.
            self._sessions[key] = _OpenSession(fingerprint, axis, session, preprocessing)
        return open_session

    def forget_volume(self, volume_id: str | None = None) -> None:
        """Drop what is known of a volume (every volume when None): its sessions (closed), states, fingerprint.

        For a node that left the scene: MRML reuses node ids after Close Scene, so a volume loaded later under the
        same id must not inherit these. All sessions are tried; the first failure to close is raised after.
        """
        def gone(vid):
            return volume_id is None or vid == volume_id

        for key in [k for k, state in self._live.items() if gone(state.volume_id)]:
            del self._live[key]
        for table in (self._fingerprints, self._voxels, self.last_propagation):
            for key in [k for k in table if gone(k if isinstance(k, str) else k[0])]:
                del table[key]
        sessions = [self._sessions.pop(key) for key in [k for k in self._sessions if gone(k[0])]]
        failure = None
        for entry in sessions:
            try:
                with as_action_error("Closing the session"):
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

    def _voxels_of(self, volume_node, fingerprint: str) -> np.ndarray:
        """One read-only copy of a volume's voxels for all its sessions (one per propagation axis), taken again only
        when the voxels change: a backend keeps the array it is given, and a CT is hundreds of MB."""
        kept = self._voxels.get(volume_node.GetID())
        if kept is None or kept[0] != fingerprint:
            voxels = geometry.volume_array_kji(volume_node)
            voxels.flags.writeable = False
            kept = self._voxels[volume_node.GetID()] = (fingerprint, voxels)
        return kept[1]

    def _prompt(self, volume_node, target, segment_id: str, axis: int, call: PromptCall, record: RasPrompt,
                write: bool = True):
        """One prompt call as one action: the segment's object (started over on a new axis) gets `call`."""
        with self._action(volume_node, target) as action:
            key = (target.segmentation_node.GetID(), segment_id)
            entry = self._session_for(volume_node, axis)
            live = self._live.get(key)
            base = live if live is not None and live.axis == axis and key in entry.obj_ids else None
            if live is not None and base is None:
                self._drop_object(key, live)  # a segment prompted on another axis starts over on this one
            obj_id = self._object_id(entry, key)
            result = call.apply(entry.session, obj_id)
            action.change(segment_id, axis, (base.calls if base else ()) + (call,),
                          (base.prompts if base else ()) + (record,))
            if not write:  # the user's voxels are the prompt: they are now what MedSAM2 knows of that slice
                action.accepted.append((axis, call.slice_index, call.slice_index))
            else:
                writer = self._writer(volume_node, target, segment_id, axis)
                action.writers.append(writer)
                writer.add(result.slice_index, result.mask)
                writer.flush()
        return result

    @contextlib.contextmanager
    def _action(self, volume_node, target):
        """One user action: bring the engine to the state undo/redo left the segments in, save the undo state,
        run; then record the new states and tag the segments (the tag makes even a no-op its own undo step)."""
        self._cancelled.clear()
        self._sync(volume_node, target)
        target.save_state_for_undo()
        action = _Action()
        try:
            yield action
        finally:
            try:
                for writer in action.writers:
                    writer.flush()  # on an error, still write what arrived: the segment shows all the backend sent
            finally:
                if action.changes or action.accepted or any(w.slabs for w in action.writers):
                    self._commit(volume_node, target, action)

    def _commit(self, volume_node, target, action: _Action) -> None:
        node, volume_id = target.segmentation_node, volume_node.GetID()
        slabs = [slab for writer in action.writers for slab in writer.slabs] + action.accepted
        fingerprint = self.fingerprint(volume_node)
        for segment_id in _segment_ids(node):
            key = (node.GetID(), segment_id)
            live = self._live.get(key)
            same_volume = live is not None and (live.volume_id, live.fingerprint) == (volume_id, fingerprint)
            if segment_id in action.changes:
                axis, calls, prompts = action.changes[segment_id]
            elif same_volume and slabs:  # another segment's write may have overwritten this one's voxels
                axis, calls, prompts = live.axis, live.calls, live.prompts
            else:
                continue
            current = segment_mask_kji(node, segment_id, volume_node)
            written = segment_states.refreshed(live.written_mask(), current, slabs) if same_volume else current
            state = SegmentState(volume_id, axis, calls, prompts, current.shape, segment_states.pack(written),
                                 fingerprint)
            self._live[key] = state
            segment_states.write_token(node, segment_id, self._book.file(state))

    def replayer(self, volume_node, target) -> Callable[[], None] | None:
        """The slow part of bringing the model to the state Undo/Redo left the segments in (replaying their
        prompts and propagations), for a GUI to run on a worker thread before its next action: a callable that
        touches no MRML, or None when no object must be rebuilt. Without it, the next action does it itself."""
        self._cancelled.clear()
        with as_action_error("Bringing MedSAM2 to the state Undo/Redo left"):
            rebuilds = self._rebuilds(volume_node, target)
        if not rebuilds:
            return None

        def replay():
            with as_action_error("Bringing MedSAM2 to the state Undo/Redo left"):
                for rebuild in rebuilds:
                    rebuild()
        return replay

    def _sync(self, volume_node, target) -> None:
        """Make every segment's engine object match the state its tag names (after undo/redo: replay)."""
        for rebuild in self._rebuilds(volume_node, target):
            rebuild()

    def _rebuilds(self, volume_node, target) -> list[Callable[[], None]]:
        """Compare each segment's tag with its engine object (MRML reads, here); return, for each object that must
        be rebuilt, a callable replaying its state's calls (backend calls only) that then records it as live."""
        node = target.segmentation_node
        fingerprint, rebuilds = None, []
        for segment_id in _segment_ids(node):
            key = (node.GetID(), segment_id)
            wanted = self._book.get(segment_states.read_token(node, segment_id))
            live = self._live.get(key)
            if wanted is live:
                continue
            if segment_states.same_object(wanted, live):
                self._set_live(key, wanted)
                continue
            if live is not None and live.axis is not None:
                self._drop_object(key, live)
            self._set_live(key, None)
            if fingerprint is None:
                fingerprint = self.fingerprint(volume_node)
            if wanted is None or wanted.axis is None or (wanted.volume_id, wanted.fingerprint) != (
                    volume_node.GetID(), fingerprint):
                self._set_live(key, wanted if wanted is not None and wanted.axis is None else None)
                continue
            entry = self._session_for(volume_node, wanted.axis)
            rebuilds.append(functools.partial(self._rebuild, entry, key, self._object_id(entry, key), wanted))
        return rebuilds

    def _rebuild(self, entry: _OpenSession, key, obj_id: int, wanted: SegmentState) -> None:
        try:
            for call in wanted.calls:
                if self._cancelled.is_set():
                    raise MedSAM2ActionError(REPLAY_CANCELLED)
                if isinstance(call, PropagateCall):
                    call.apply(entry.session, obj_id, watch=lambda run: setattr(self, "_run", run))
                    self._run = None
                else:
                    call.apply(entry.session, obj_id)
            if self._cancelled.is_set():
                raise MedSAM2ActionError(REPLAY_CANCELLED)
        except BaseException:
            self._run = None
            entry.obj_ids.pop(key, None)  # a half-built object is never used: the next action builds a new one
            raise
        self._set_live(key, wanted)

    def _set_live(self, key, state: SegmentState | None) -> None:
        if state is None:
            self._live.pop(key, None)
        else:
            self._live[key] = state

    def _tagged_state(self, volume_node, target, segment_id: str) -> SegmentState | None:
        """The state the segment's tag names (what Undo/Redo left), if it is of this volume's voxels; reading it
        rebuilds nothing (the prompt list asks on every selection change)."""
        state = self._book.get(segment_states.read_token(target.segmentation_node, segment_id))
        if state is None or (state.volume_id, state.fingerprint) != (volume_node.GetID(),
                                                                      self.fingerprint(volume_node)):
            return None
        return state

    def _group_runs(self, volume_node, target, segment_ids, options: dict) -> dict[tuple, list[str]]:
        """Segments by the engine run they share: (axis, first slice, last slice). The range is the options',
        else a segment's 3D box's (`_box_range`), else the whole volume (None, None)."""
        groups: dict[tuple, list[str]] = {}
        for segment_id in segment_ids:
            live = self._live.get((target.segmentation_node.GetID(), segment_id))
            if live is None or live.axis is None or live.volume_id != volume_node.GetID():
                name = "this segment" if len(segment_ids) == 1 else f"segment {segment_id!r}"
                raise MedSAM2ActionError(f"Place a point or a box for {name} before propagating.")
            start, stop = options["start"], options["stop"]
            if start is None and stop is None:
                start, stop = _box_range(live.prompts) or (None, None)
            groups.setdefault((live.axis, start, stop), []).append(segment_id)
        if not groups:
            raise MedSAM2ActionError("No segment of this segmentation has a MedSAM2 prompt yet.")
        return groups

    def _take_edits(self, volume_node, target, entry: _OpenSession, segment_id: str, obj_id: int,
                    action: _Action) -> set[int]:
        """Give the model, as mask corrections, the slices the user changed since MedSAM2 last wrote them."""
        live = self._live[(target.segmentation_node.GetID(), segment_id)]
        current = segment_mask_kji(target.segmentation_node, segment_id, volume_node)
        edited = segment_states.edited_slices(live.written_mask(), current, live.axis)
        calls, prompts = list(live.calls), list(live.prompts)
        for k in edited:
            call = PromptCall(k, {"mask": np.take(current, k, axis=live.axis)}, "edit")
            call.apply(entry.session, obj_id)
            calls.append(call)
            prompts.append(RasPrompt(k, live.axis, source="edit", mask=call.kwargs["mask"]))
            action.accepted.append((live.axis, k, k))
        if edited:
            action.change(segment_id, live.axis, calls, prompts)
        return set(edited)

    def _record_call(self, target, action: _Action, segment_id: str, call) -> None:
        """Add an engine call to what this action changed of a segment's state (after any edits it took)."""
        if segment_id in action.changes:
            axis, calls, prompts = action.changes[segment_id]
        else:
            live = self._live[(target.segmentation_node.GetID(), segment_id)]
            axis, calls, prompts = live.axis, live.calls, live.prompts
        action.change(segment_id, axis, calls + (call,), prompts)

    def _session_for(self, volume_node, axis: int) -> _OpenSession:
        key = (volume_node.GetID(), axis)
        fingerprint = self.fingerprint(volume_node)
        entry = self._sessions.get(key)
        if entry is not None and entry.fingerprint != fingerprint:
            self._drop_session(key)
            entry = None
        preprocessing = volume_settings.preprocessing_for(volume_node, self.preprocessing)  # its own, else ours
        if entry is None:
            session = self.backend.open_session(self._voxels_of(volume_node, fingerprint),
                                                geometry.spacing_kji(volume_node), axis, preprocessing,
                                                fingerprint=fingerprint)
            entry = self._sessions[key] = _OpenSession(fingerprint, axis, session, preprocessing)
        elif entry.preprocessing != preprocessing:
            entry.session.set_preprocessing(preprocessing)
            entry.preprocessing = preprocessing
        return entry

    def _drop_session(self, key) -> None:
        """A changed volume: its session closes and its segments' objects are gone (their prompts are not
        replayed on other voxels)."""
        entry = self._sessions.pop(key)
        for segment_key in entry.obj_ids:
            self._live.pop(segment_key, None)
        entry.session.close()

    def _drop_object(self, key, state: SegmentState) -> None:
        entry = self._sessions.get((state.volume_id, state.axis))
        if entry is not None and key in entry.obj_ids:
            entry.session.reset_object(entry.obj_ids.pop(key))

    @staticmethod
    def _object_id(entry: _OpenSession, key) -> int:
        if key not in entry.obj_ids:
            entry.obj_ids[key] = entry.next_obj_id
            entry.next_obj_id += 1
        return entry.obj_ids[key]

    @staticmethod
    def _writer(volume_node, target, segment_id: str | None, axis: int) -> SliceBatchWriter:
        ijk_to_local = geometry.ijk_to_node_local(volume_node, target.segmentation_node)
        return SliceBatchWriter(target, segment_id, ijk_to_local, _shape_kji(volume_node), axis,
                                reference=target.reference_geometry(), save_undo=False)  # `_action` saved it


def _box_range(prompts) -> tuple[int, int] | None:
    """The slices a segment's latest 3D box limits propagation to, widened to every slice the user prompted."""
    ranges = [p.slice_range for p in prompts if p.slice_range is not None]
    if not ranges:
        return None
    prompted = [p.slice_index for p in prompts]
    return min(ranges[-1][0], *prompted), max(ranges[-1][1], *prompted)


def _segment_ids(segmentation_node) -> list[str]:
    return list(segmentation_node.GetSegmentation().GetSegmentIDs())


def _shape_kji(volume_node) -> tuple[int, int, int]:
    return tuple(reversed(volume_node.GetImageData().GetDimensions()))


def _slice_center_ras(ijk_to_ras: np.ndarray, volume_node, axis: int, slice_index: int) -> np.ndarray:
    center_kji = (np.array(_shape_kji(volume_node), float) - 1) / 2
    center_kji[axis] = slice_index
    return geometry.ijk_to_ras(center_kji[::-1], ijk_to_ras)[0]
