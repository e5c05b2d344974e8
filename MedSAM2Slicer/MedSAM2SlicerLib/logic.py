"""`MedSAM2SlicerLogic`: the whole workflow from the Python console, no GUI needed.

    import MedSAM2Slicer
    logic = MedSAM2Slicer.MedSAM2SlicerLogic()
    logic.connect(url="http://gpu-host:8765", token="...")   # or logic.start_local_server(checkpoint="MedSAM2_latest")
    segment_id = logic.segment(volume, segmentation, box_ras=[[x0, y0, z], [x1, y1, z]], view="axial")

The panel and the effect use the same instance (`shared_logic()`), so a connection made in one is used by both.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import slicer
import vtk

from . import geometry, panel_settings
from .background import ActionGuard
from .controller import MedSAM2ActionError, PromptOutcome, PropagationOutcome, SessionController
from .local_backend import LocalServer, LocalServerError
from .mrml_io import EditorLogicTarget


class InProcessBackend:
    """An engine object (SAM-2 or the test engine) behind the backend interface the client also offers.

    Preprocessing travels as a dict of `Preprocessing` fields, exactly as it does over the network; engine
    sessions take that form themselves.
    """

    def __init__(self, engine):
        self.engine = engine

    def open_session(self, volume_kji: np.ndarray, spacing_kji, axis: int, preprocessing: dict | None,
                     fingerprint: str | None = None):
        """`fingerprint` only matters to a server (it skips re-uploads); in process there is nothing to skip."""
        return self.engine.open_session(volume_kji, spacing_kji, axis, preprocessing)


logger = logging.getLogger(__name__)


class SegmentOutcome(str):
    """What `segment` returns: the segment id (a `str`, as it always was), carrying what else the user must know:
    `warnings` (an oblique view, random weights), the `prompt` outcome and the `propagation` outcome (or None)."""

    prompt: PromptOutcome
    propagation: PropagationOutcome | None
    warnings: list

    def __new__(cls, segment_id: str, prompt: PromptOutcome, propagation: PropagationOutcome | None,
                warnings: list):
        outcome = super().__new__(cls, segment_id)
        outcome.prompt, outcome.propagation, outcome.warnings = prompt, propagation, list(warnings)
        return outcome


def open_segment_editor(segmentation_node):
    """The app's Segment Editor widget while it edits this segmentation, else None (always None headless).

    Assumes Slicer 5.10's Segment Editor module (`Modules/Scripted/SegmentEditor/SegmentEditor.py`): its widget's
    `editor` is the `qMRMLSegmentEditorWidget`, whose public slots `saveStateForUndo()`, `undo()` and `redo()`
    drive the history that Ctrl+Z and the editor's Undo/Redo buttons use.
    """
    module = getattr(getattr(slicer, "modules", None), "segmenteditor", None)
    representation = module.widgetRepresentation() if module is not None else None
    editor = getattr(representation.self(), "editor", None) if representation is not None else None
    if editor is None:
        return None
    node = editor.segmentationNode()
    return editor if node is not None and node.GetID() == segmentation_node.GetID() else None


# The editor settings a console write takes from an open Segment Editor, so it honours what the user sees there.
EDITOR_SETTINGS = ("MaskMode", "MaskSegmentID", "OverwriteMode", "SourceVolumeIntensityMask",
                   "SourceVolumeIntensityMaskRange")


@dataclasses.dataclass
class ConnectionInfo:
    kind: str  # "remote", "local server", "local" (in this process) or "in-process"
    description: str


def describe_capabilities(capabilities: dict) -> str:
    """A server's capabilities as the lines the panel shows, the random-weights warning first."""
    engine = capabilities.get("engine", {})
    lines = [f"WARNING: {capabilities['warning']}"] if capabilities.get("warning") else []
    lines += [f"Model: {engine.get('model', '?')}",
              describe_checkpoint(engine),
              f"Device: {engine.get('device', '?')} ({engine.get('precision', '?')})",
              f"Server: {capabilities.get('server_version', '?')}, protocol {capabilities.get('protocol_version')}"]
    return "\n".join(lines)


def describe_checkpoint(engine: dict) -> str:
    """The checkpoint line: its name, where a downloaded one came from (Hub repository, commit) and its SHA-256."""
    line = f"Checkpoint: {engine.get('checkpoint', '?')}"
    if engine.get("checkpoint_revision"):
        line += f" from {engine.get('checkpoint_source') or 'the Hub'} at commit {engine['checkpoint_revision'][:12]}"
    if engine.get("checkpoint_sha256"):
        line += f", SHA-256 {engine['checkpoint_sha256']}"
    return line


class MedSAM2SlicerLogic:
    """Connect to a backend, then segment volume nodes from RAS prompts into segments."""

    def __init__(self):
        self.controller: SessionController | None = None
        self.connection: ConnectionInfo | None = None
        self.preprocessing: dict | None = None
        self._targets: dict[str, EditorLogicTarget] = {}  # segmentation node id -> its undo history
        self._warning: str | None = None  # the backend's warning, once asked ("" when it has none)
        self.local_server: LocalServer | None = None
        self.guard = ActionGuard()  # the GUI's one-action-at-a-time (the console API does not use it)
        self._choices: dict | None = None  # the connected backend's lists, asked once per connection

    def connect(self, url: str | None = None, token: str | None = None, *, checkpoint: str | None = None,
                engine=None, device: str | None = None) -> ConnectionInfo:
        """Use a server (`url`), a local SAM-2 model (`checkpoint`) or any engine object (`engine`)."""
        if sum(x is not None for x in (url, checkpoint, engine)) != 1:
            raise MedSAM2ActionError("Connect to exactly one backend: a server URL, a checkpoint, or an engine.")
        if url is not None:
            from medsam2_client import MedSAM2Client, errors

            try:
                backend, info = MedSAM2Client(url, token), ConnectionInfo("remote", url)
            except errors.MedSAM2Error as error:  # e.g. an address without http:// (a sentence already)
                raise MedSAM2ActionError(str(error)) from error
        elif checkpoint is not None:
            from medsam2_backend.engine import load_engine

            engine = load_engine(checkpoint, device=device)
            backend, info = InProcessBackend(engine), ConnectionInfo("local", str(checkpoint))
        else:
            backend, info = InProcessBackend(engine), ConnectionInfo("in-process", type(engine).__name__)
        self.close()
        self._warning = self._choices = None
        self.controller = SessionController(backend, self.preprocessing)
        self.connection = info
        return info

    def start_local_server(self, checkpoint: str | None = None, *, waiting=None, **options) -> ConnectionInfo:
        """Start a `medsam2-server` on this computer (options as `LocalServer`) and connect to it."""
        try:
            server = LocalServer(checkpoint, **options)
            url = server.start(waiting)
        except LocalServerError as error:
            raise MedSAM2ActionError(str(error)) from error
        try:
            info = self.connect(url=url, token=server.token)  # closes a previous connection and its server
        except BaseException:
            server.stop()
            raise
        self.local_server = server
        info.kind = "local server"
        return info

    def capabilities(self) -> dict:
        """What the connected server offers (model, checkpoint, device, warnings); raises a sentence on failure."""
        controller = self._require_controller()
        if not hasattr(controller.backend, "capabilities"):
            return {"engine": controller.backend.engine.describe()}
        try:
            return controller.backend.capabilities()
        except Exception as error:  # the client's typed errors carry the sentence to show
            raise MedSAM2ActionError(f"The server did not answer: {error}") from error

    def choices(self, capabilities: dict | None = None) -> dict:
        """The lists the panel and the effect show (CT presets, precisions, directions): this extension's own
        until a backend is connected, then the ones it reports: asked once per connection (a backend that does
        not answer is not asked again each time the effect is picked; its error shows on the next action), or
        taken from `capabilities` just fetched."""
        if self.controller is None:
            return panel_settings.choices_from_capabilities({})
        if capabilities is None and self._choices is None:
            try:
                capabilities = self.capabilities()
            except MedSAM2ActionError:
                capabilities = {}
        if capabilities is not None:
            self._choices = panel_settings.choices_from_capabilities(capabilities)
        return self._choices

    def set_preprocessing(self, preprocessing: dict | None) -> None:
        """Intensity preprocessing as `Preprocessing` fields, e.g. {"preset": "soft_tissue"}; None for MR/other."""
        self.preprocessing = dict(preprocessing) if preprocessing else None
        if self.controller is not None:
            self.controller.set_preprocessing(self.preprocessing)

    def segment(self, volume_node, segmentation_node, segment_id: str | None = None, *, points_ras=None,
                labels=None, box_ras=None, roi_node=None, view="axial", propagate: bool = True,
                direction: str = "both", start=None, stop=None, stop_after_empty=None, postprocess=(),
                progress=None, box_margin_mm: float = geometry.DEFAULT_BOX_MARGIN_MM) -> str:
        """Prompt one slice (points and/or a box: 2 opposite RAS corners of a rectangle in the view, or more
        corners, whose bounding rectangle on the slice is the box; or an ROI node) and optionally propagate.

        A box that spans several slices (an ROI that is not flat, or 8 corners) is a 3D box: its centre slice
        is prompted with its outline there, and the segment's propagations stay within its slices plus
        `box_margin_mm` unless given `start`/`stop` (`outcome.prompt.slice_range`).
        `view` is the view the prompt belongs to ('axial', 'sagittal', 'coronal' or a 4x4 slice-to-RAS); it
        picks the propagation axis. Returns the id of the segment written (created when `segment_id` is None), as
        a `SegmentOutcome`: a `str` that also carries `warnings` (logged too), `prompt` and `propagation`.
        """
        controller = self._require_controller()
        target = self.target_for(segmentation_node, volume_node)
        if roi_node is not None and not roi_node.IsA("vtkMRMLMarkupsROINode"):
            raise MedSAM2ActionError(f"roi_node must be a markups ROI (vtkMRMLMarkupsROINode), not a "
                                     f"{roi_node.GetClassName()}.")
        created = segment_id is None
        if created:
            segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", "MedSAM2")
        elif segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise MedSAM2ActionError(f"The segmentation has no segment with id {segment_id!r}.")
        try:
            if roi_node is not None:
                box_ras = geometry.roi_corners_ras(roi_node)
            elif box_ras is not None:  # two corners of a rectangle in the view, not in the volume's grid
                box_ras = geometry.view_rectangle_corners(box_ras, geometry.view_slice_to_ras(view))
            prompt = controller.add_prompt(volume_node, target, segment_id, points_ras=points_ras, labels=labels,
                                           box_corners_ras=box_ras, slice_to_ras=geometry.view_slice_to_ras(view),
                                           box_margin_mm=box_margin_mm)
        except MedSAM2ActionError:
            if created:  # a refused first prompt leaves no empty segment behind
                segmentation_node.GetSegmentation().RemoveSegment(segment_id)
            raise
        warnings = [w for w in (prompt.axis_warning, self.backend_warning()) if w]
        for warning in warnings:
            logger.warning("MedSAM2: %s", warning)
        propagation = None
        if propagate:
            propagation = self.propagate(volume_node, segmentation_node, segment_id, direction=direction,
                                         start=start, stop=stop, stop_after_empty=stop_after_empty,
                                         postprocess=postprocess, progress=progress)
        return SegmentOutcome(segment_id, prompt, propagation, warnings)

    def prompt_from_segment(self, volume_node, segmentation_node, segment_id: str, *, view="axial",
                            propagate: bool = False, **options) -> PromptOutcome:
        """Use the segment's voxels on the slice `view` shows as the prompt (first prompt or correction), e.g.
        a slice painted by hand; optionally propagate (options as `propagate`). The voxels are not changed."""
        controller = self._require_controller()
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise MedSAM2ActionError(f"The segmentation has no segment with id {segment_id!r}.")
        outcome = controller.prompt_from_segment(volume_node, self.target_for(segmentation_node, volume_node),
                                                 segment_id, geometry.view_slice_to_ras(view))
        if outcome.axis_warning:
            logger.warning("MedSAM2: %s", outcome.axis_warning)
        if propagate:
            self.propagate(volume_node, segmentation_node, segment_id, **options)
        return outcome

    def propagate(self, volume_node, segmentation_node, segment_id: str, **options) -> PropagationOutcome:
        """Propagate a prompted segment (options as `SessionController.propagate`). Slices edited since MedSAM2
        wrote them are taken as corrections first (`outcome.edits_taken`, `outcome.status()`)."""
        return self._require_controller().propagate(
            volume_node, self.target_for(segmentation_node, volume_node), segment_id, **options)

    def propagate_all(self, volume_node, segmentation_node, segment_ids=None, **options) -> PropagationOutcome:
        """Propagate every MedSAM2-prompted segment of the segmentation (or `segment_ids`) together: each slice
        is encoded once for all of them, and the whole propagation is one undo step."""
        controller = self._require_controller()
        target = self.target_for(segmentation_node, volume_node)
        if segment_ids is None:
            segment_ids = controller.propagated_segments(volume_node, target)
        return controller.propagate_segments(volume_node, target, list(segment_ids), **options)

    def reset(self, segmentation_node, segment_id: str) -> None:
        """Forget a segment's MedSAM2 prompts (its voxels stay; one undo step, so Undo brings the prompts back)."""
        target = self._targets.get(segmentation_node.GetID())
        if self.controller is None or target is None:
            return  # nothing was prompted from here: there is nothing to forget
        volume_node = target.logic.GetSourceVolumeNode()
        self.controller.reset_segment(volume_node, self.target_for(segmentation_node, volume_node), segment_id)

    def undo(self, segmentation_node) -> None:
        """Undo the last step in this segmentation's history (the Segment Editor's, when it edits it)."""
        history = self._history(segmentation_node)
        if history is not None:
            history.undo()

    def redo(self, segmentation_node) -> None:
        """Redo the step last undone in this segmentation's history."""
        history = self._history(segmentation_node)
        if history is not None:
            history.redo()

    def backend_warning(self) -> str | None:
        """The connected backend's warning (random weights), asked once per connection."""
        if self._warning is None and self.controller is not None:
            try:
                capabilities = self.capabilities()
            except MedSAM2ActionError:  # the action itself worked; the next one asks again
                return None
            warning = capabilities.get("warning")
            if warning is None and capabilities.get("engine", {}).get("random_weights"):
                from medsam2_backend.engine.model import RANDOM_WEIGHTS_WARNING  # in process: the engine is here

                warning = RANDOM_WEIGHTS_WARNING
            self._warning = warning or ""
        return self._warning or None

    def target_for(self, segmentation_node, volume_node) -> EditorLogicTarget:
        """The console's write target for a segmentation (one per segmentation, so its undo history persists).
        While the app's Segment Editor edits the same segmentation, its history and settings are used."""
        if segmentation_node.GetNodeReference(
                slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is None:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        _settle_display(segmentation_node)
        target = self._targets.get(segmentation_node.GetID())
        if target is None:
            target = self._targets[segmentation_node.GetID()] = EditorLogicTarget(segmentation_node, volume_node)
        else:
            target.logic.SetSourceVolumeNode(volume_node)
        target.history = open_segment_editor(segmentation_node)
        if target.history is not None:
            shown = target.history.mrmlSegmentEditorNode()
            for name in EDITOR_SETTINGS:
                value = getattr(shown, "Get" + name)()
                getattr(target.editor_node, "Set" + name)(*(value if name.endswith("Range") else (value,)))
        return target

    def _history(self, segmentation_node):
        editor = open_segment_editor(segmentation_node)
        return editor if editor is not None else self._targets.get(segmentation_node.GetID())

    def close(self) -> None:
        """Close the backend sessions, and stop the local server if this logic started one."""
        try:
            if self.controller is not None:
                self.controller.close()
        finally:
            self.controller = None
            self.connection = None
            if self.local_server is not None:
                self.local_server.stop()
                self.local_server = None

    def watch_scene(self, scene) -> None:
        """Forget sessions and prompts of nodes that leave `scene`, and everything when the scene is closed.

        MRML reuses node ids after Close Scene (`vtkMRMLScene::Clear` resets its id counters), and everything here
        is keyed by node id: without this, data loaded after a close would inherit the old prompts.
        """
        scene.AddObserver(slicer.vtkMRMLScene.EndCloseEvent, lambda caller, event: self._forget(None))
        scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, self._on_node_removed)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_node_removed(self, caller, event, node):
        if node.IsA("vtkMRMLSegmentationNode"):
            self._targets.pop(node.GetID(), None)
        elif node.IsA("vtkMRMLVolumeNode"):
            self._forget(node.GetID())

    def _forget(self, volume_id):
        """`volume_id` None: the scene was closed. Runs in an MRML observer, which must not raise."""
        if volume_id is None:
            self._targets.clear()
            if self.controller is not None:
                self.controller.cancel()  # a propagation running on a worker thread stops at its next slice
        if self.controller is not None:
            try:
                self.controller.forget_volume(volume_id)
            except MedSAM2ActionError as error:  # a server gone away: its sessions are gone too
                print(f"MedSAM2: {error}")

    def shutdown(self, timeout_s: float = 1.0) -> list[str]:
        """Close everything at exit, best effort: a short network timeout, every session tried, the local server
        stopped whatever happened; returns the problems as sentences (for a log) instead of raising."""
        backend = getattr(self.controller, "backend", None)
        for name in ("connect_timeout", "timeout"):  # the network client's; an in-process engine has neither
            if hasattr(backend, name):
                setattr(backend, name, min(getattr(backend, name), timeout_s))
        try:
            self.close()
        except MedSAM2ActionError as error:
            return [str(error)]
        return []

    def _require_controller(self) -> SessionController:
        if self.controller is None:
            raise MedSAM2ActionError("Not connected: connect to a MedSAM2 server or load a model first.")
        return self.controller


_shared_logic: MedSAM2SlicerLogic | None = None


def shared_logic() -> MedSAM2SlicerLogic:
    """The one logic the module panel and the Segment Editor effect share in an app session."""
    global _shared_logic
    if _shared_logic is None:
        _shared_logic = MedSAM2SlicerLogic()
    return _shared_logic


# vtkSegment's "no colour yet" grey: the display node replaces it with a generated colour, at the latest at the
# segment's first export (slicer.util.arrayFromSegmentBinaryLabelmap, a view update).
_UNSET_COLOUR = (0.5, 0.5, 0.5)


def _settle_display(segmentation_node) -> None:
    """Give a segmentation the console writes into its display node (so it shows in the views, as the app's
    Segment Editor gives it one) and its segments their colours now, before any undo state is saved.

    A colour assigned later is a segment modification outside any action: after an Undo, vtkSegmentationHistory
    takes it for a new edit, drops the redo states and adds an undo step that changes nothing."""
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        if tuple(segment.GetColor()) == _UNSET_COLOUR:
            colour = [0.0, 0.0, 0.0]
            display.GenerateSegmentColor(colour)
            segment.SetColor(colour)
