"""Prompts files and prompts from labels, checked on the image's grid before any model is involved."""

import json

import numpy as np
import pytest

from medsam2_backend.batch.errors import CaseInputError
from medsam2_backend.batch.prompts import LabelTruth, label_truths, load_prompts, parse_axis, prompts_from_labels

GRID = np.diag([-1.0, -1.0, 2.0, 1.0])  # RAS: I runs right-to-left, K superior with 2 mm slices
SHAPE = (10, 20, 30)  # K, J, I


def prompts(tmp_path, data):
    (tmp_path / "p.json").write_text(json.dumps(data))
    return load_prompts(tmp_path / "p.json", GRID, SHAPE, margin_mm=2.0)  # one slice beyond a 3D box


@pytest.mark.parametrize("objects, words", [
    ([{"name": "a", "box": [[0, 0, 0], [4, 4, 0]]}, {"name": "a", "box": [[0, 0, 0], [4, 4, 0]]}], "unique"),
    ([{"name": "a"}], "needs a \"box\", \"points\" or both"),
    ([{"name": "a", "points": [[1, 1, 1]], "labels": [1, 0]}], "one label per point"),
    ([{"name": "a", "points": [[1, 1]], "labels": [1]}], "three finite numbers"),
    ([{"name": "a", "box": [[0, 0, 0], [4, 4, 4], [5, 5, 5]]}], "two opposite corners"),
    ([{"name": "a", "box": [[1, 1, 2], [8, 8, 4]], "points": [[3, 3, 8]], "labels": [1]}], "outside its 3D box"),
    ([{"name": "a", "axis": "x", "box": [[0, 0, 0], [4, 4, 0]]}], "Unknown axis"),
    ([{"name": "a", "color": [2, 0, 0], "box": [[0, 0, 0], [4, 4, 0]]}], "three numbers from 0 to 1"),
    ([{"name": "a", "coordinates": "XYZ", "box": [[0, 0, 0], [4, 4, 0]]}], "coordinates must be"),
])
def test_bad_prompts_name_the_object_and_the_problem(tmp_path, objects, words):
    with pytest.raises(CaseInputError, match="object") as info:
        prompts(tmp_path, {"coordinates": "voxel", "objects": objects})
    assert words in str(info.value)


def test_points_go_to_their_nearest_slices_and_the_default_axis_is_superior(tmp_path):
    objs = prompts(tmp_path, {"coordinates": "voxel", "objects": [
        {"name": "a", "points": [[3, 4, 2], [5, 6, 2.4], [7, 8, 6]], "labels": [1, 0, 1]}]})
    (obj,) = objs
    assert obj.axis == 0 and [s.slice_index for s in obj.steps] == [2, 6]
    assert obj.steps[0].points == [[3, 4], [5, 6]] and obj.steps[0].labels == [1, 0]
    assert parse_axis("sagittal", GRID) == 2 and parse_axis("i", GRID) == 2 and parse_axis("2", GRID) == 0


def test_label_boxes_with_jitter_are_reproducible_and_bounded():
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:6, 5:12, 8:20] = 4
    labels[4, 4:13, 8:20] = 4  # slice 4 has the largest area
    (plain,) = prompts_from_labels(label_truths(labels), 0)
    assert plain.steps[0].slice_index == 4 and plain.steps[0].box == [8, 4, 19, 12]
    a = prompts_from_labels(label_truths(labels), 0, jitter_px=2, seed=7)[0].steps[0].box
    b = prompts_from_labels(label_truths(labels), 0, jitter_px=2, seed=7)[0].steps[0].box
    c = prompts_from_labels(label_truths(labels), 0, jitter_px=2, seed=8)[0].steps[0].box
    assert a == b and a != c
    assert all(abs(x - y) <= 2 for x, y in zip(a, plain.steps[0].box))


def test_components_are_objects_of_their_own_and_unknown_values_are_errors():
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 2:5, 2:5] = 1
    labels[6:9, 10:15, 20:25] = 1
    objs = prompts_from_labels([LabelTruth(1, "node", labels == 1)], 0, per_component=True)
    assert [(o.label, o.name) for o in objs] == [(1, "node 1"), (2, "node 2")]
    assert objs[0].truth.sum() == 18 and objs[1].truth.sum() == 75
    with pytest.raises(CaseInputError, match=r"Label value\(s\) 3 are not in the label map \(it has 1\)"):
        prompts_from_labels(label_truths(labels), 0, values=[3])
