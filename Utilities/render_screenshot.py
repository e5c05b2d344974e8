"""Render the Extensions Index screenshot offscreen: a real result of the extension's code, headless.

    .venv/bin/python Utilities/render_screenshot.py [--out Resources/Screenshots/MedSAM2Slicer_result.png]

It loads slicerio's CTChest4 CT into an MRML volume node, segments it through `MedSAM2SlicerLogic` (one positive
point on the middle axial slice, propagated both ways) and draws axial, coronal and sagittal slices through the
point as Slicer's views orient them (segment filled and outlined, the prompt marked) plus the segment's closed
surface over the CT's bone surface in 3D (VTK, offscreen). No MedSAM2 weights exist on the machines this runs on,
so the masks come from the deterministic test engine (a disk per point, shrinking slice by slice) and the picture
says so in its title. `make screenshot` runs it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT / "backend" / "src", ROOT / "MedSAM2Slicer"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import slicer  # noqa: E402
import vtk  # noqa: E402
from medsam2_backend.engine import DiskEngine  # noqa: E402
from medsam2_client.geometry import VIEW_ORIENTATIONS  # noqa: E402

from MedSAM2SlicerLib import demo, geometry, mrml_io  # noqa: E402
from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic  # noqa: E402

PANEL_PX, PANEL_MM = 420, 400.0  # each panel shows 400 mm around the prompt
TITLE = "MedSAM2Slicer on CTChest4 - masks from the DETERMINISTIC TEST ENGINE (no model weights), not MedSAM2"
BONE_HU = 250.0
TINT = 0.35  # the segment's fill opacity in the slice views
SEGMENT_RGB = (0.95, 0.6, 0.2)  # set on the segment, as a user would pick it (a new segment's default is grey)


def segment_ct():
    """The CT volume node, its segmentation, the segment id and the prompt point (RAS), via the console API."""
    import slicerio

    scene, slicer.modules = mrml_io.headless_scene()
    slicer.mrmlScene = scene
    volume = demo.load_volume(scene, slicerio.get_testdata_file("CTChest4.nrrd"))
    dims = volume.GetImageData().GetDimensions()
    point_ras = geometry.ijk_to_ras(np.array([[dims[0] * 0.45, dims[1] * 0.55, dims[2] // 2]], float),
                                    geometry.ijk_to_world_ras(volume))[0]
    logic = MedSAM2SlicerLogic()
    logic.connect(engine=DiskEngine(radius=22, shrink=2))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CTChest4 MedSAM2")
    segment_id = logic.segment(volume, segmentation, points_ras=[point_ras], labels=[1], view="axial",
                               propagate=False)
    logic.propagate(volume, segmentation, segment_id, direction="both")
    logic.close()
    segmentation.GetSegmentation().GetSegment(segment_id).SetColor(*SEGMENT_RGB)
    return volume, segmentation, segment_id, point_ras


def reslice(array_kji: np.ndarray, ras_to_ijk: np.ndarray, view: str, center_ras, order: int) -> np.ndarray:
    """The plane of a Slicer view through `center_ras`, PANEL_PX square at PANEL_MM, rows top to bottom."""
    from scipy import ndimage

    axes = VIEW_ORIENTATIONS[view]  # columns: screen right, screen up, normal (RAS)
    offsets = (np.arange(PANEL_PX) - (PANEL_PX - 1) / 2) * PANEL_MM / PANEL_PX
    right, up = np.meshgrid(offsets, offsets[::-1])
    ras = center_ras + right[..., None] * axes[:, 0] + up[..., None] * axes[:, 1]
    ijk = ras.reshape(-1, 3) @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]
    values = ndimage.map_coordinates(array_kji, ijk[:, ::-1].T, order=order, mode="constant", cval=-1000.0)
    return values.reshape(PANEL_PX, PANEL_PX)


def slice_panel(voxels_kji, mask_kji, ijk_to_ras, view: str, center_ras, colour, prompt_ras=None):
    from PIL import Image, ImageDraw

    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    rgb = demo.grey_rgb(reslice(voxels_kji.astype(np.float32), ras_to_ijk, view, center_ras, 1))
    mask = reslice(mask_kji.astype(np.float32), ras_to_ijk, view, center_ras, 0) > 0.5
    colour = np.asarray(colour, float) * 255
    rgb[mask] = (1 - TINT) * rgb[mask] + TINT * colour
    rgb[demo.outline(mask)] = colour
    image = Image.fromarray(rgb.astype(np.uint8))
    if prompt_ras is not None:  # the point, where the view shows it
        x, y = (PANEL_PX - 1) / 2, (PANEL_PX - 1) / 2
        ImageDraw.Draw(image).ellipse((x - 5, y - 5, x + 5, y + 5), outline=demo.PROMPT_RGB, width=2)
    demo.label_tile(image, f"{view} (positive point)" if prompt_ras is not None else view)
    return image


def surface_panel(volume, segmentation, segment_id, colour):
    """The segment's closed surface (Slicer's own conversion) over the CT's bone iso-surface, rendered offscreen."""
    from PIL import Image
    from vtk.util import numpy_support

    segmentation.CreateClosedSurfaceRepresentation()
    segment_surface = vtk.vtkPolyData()
    segmentation.GetClosedSurfaceRepresentation(segment_id, segment_surface)
    # The CT's bones in RAS: an iso-surface in IJK, moved by the volume's IJK->RAS matrix.
    bone = vtk.vtkFlyingEdges3D()
    image = vtk.vtkImageData()
    image.DeepCopy(volume.GetImageData())
    image.SetOrigin(0, 0, 0)
    image.SetSpacing(1, 1, 1)
    bone.SetInputData(image)
    bone.SetValue(0, BONE_HU)
    to_ras = vtk.vtkTransform()
    to_ras.SetMatrix(geometry.vtk_matrix(geometry.ijk_to_world_ras(volume)))
    bone_ras = vtk.vtkTransformPolyDataFilter()
    bone_ras.SetTransform(to_ras)
    bone_ras.SetInputConnection(bone.GetOutputPort())

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.08, 0.09, 0.12)
    for source, rgb, opacity in ((bone_ras, (0.92, 0.88, 0.8), 0.35), (segment_surface, colour, 1.0)):
        mapper = vtk.vtkPolyDataMapper()
        if isinstance(source, vtk.vtkPolyData):
            mapper.SetInputData(source)
        else:
            mapper.SetInputConnection(source.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*rgb)
        actor.GetProperty().SetOpacity(opacity)
        renderer.AddActor(actor)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(PANEL_PX, PANEL_PX)
    window.AddRenderer(renderer)
    camera = renderer.GetActiveCamera()  # from anterior, slightly right and above, superior up
    camera.SetFocalPoint(*segment_surface.GetCenter())
    camera.SetPosition(*(np.array(segment_surface.GetCenter()) + [-250.0, 700.0, 200.0]))
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.3)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    output = grab.GetOutput()
    width, height, _ = output.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    panel = Image.fromarray(np.ascontiguousarray(pixels))
    demo.label_tile(panel, "3D: segment surface, CT bone")
    return panel


def render(out_path: pathlib.Path) -> pathlib.Path:
    from PIL import Image

    volume, segmentation, segment_id, point_ras = segment_ct()
    colour = segmentation.GetSegmentation().GetSegment(segment_id).GetColor()
    voxels = slicer.util.arrayFromVolume(volume)
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    ijk_to_ras = geometry.ijk_to_world_ras(volume)
    panels = [slice_panel(voxels, mask, ijk_to_ras, "axial", point_ras, colour, prompt_ras=point_ras),
              surface_panel(volume, segmentation, segment_id, colour),
              slice_panel(voxels, mask, ijk_to_ras, "coronal", point_ras, colour),
              slice_panel(voxels, mask, ijk_to_ras, "sagittal", point_ras, colour)]
    title_px = 30
    sheet = Image.new("RGB", (2 * PANEL_PX, 2 * PANEL_PX + title_px))
    demo.label_tile(sheet, TITLE, xy=(8, 7))
    for n, panel in enumerate(panels):
        sheet.paste(panel, ((n % 2) * PANEL_PX, title_px + (n // 2) * PANEL_PX))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, optimize=True)
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path,
                        default=ROOT / "Resources" / "Screenshots" / "MedSAM2Slicer_result.png")
    print(render(parser.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
