"""`medsam2-segment batch`: a manifest through Ray (local, and a cluster started here), resume, failures, summaries.

Ray stays on this machine: loopback address, no dashboard, usage stats off. A cluster is a `ray start --head
--block` this test starts and stops by its process id.
"""

import csv
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from medsam2_backend.batch import cohort  # noqa: E402
from medsam2_backend.cli import main  # noqa: E402

CT = slicerio.get_testdata_file("CTChest4.nrrd")
SEG = slicerio.get_testdata_file("Segmentation.seg.nrrd")


def synthetic_case(folder, name):
    """A small NIfTI with a two-label map on its grid."""
    rng = np.random.default_rng(len(name))
    image = sitk.GetImageFromArray(rng.integers(0, 100, (8, 20, 24)).astype(np.int16))
    image.SetSpacing((1.0, 1.2, 3.0))
    image.SetOrigin((5.0, -3.0, 2.0))
    labels = np.zeros((8, 20, 24), np.uint8)
    labels[2:6, 4:12, 5:15] = 1
    labels[3:7, 13:18, 8:20] = 2
    label_itk = sitk.GetImageFromArray(labels)
    label_itk.CopyInformation(image)
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    sitk.WriteImage(label_itk, str(folder / f"{name}_labels.nii.gz"))


def write_manifest(folder, rows, columns=("id", "image", "labels", "prompts")):
    with open(folder / "cohort.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return folder / "cohort.csv"


@pytest.fixture
def cohort_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CT, data / "ct.nrrd")
    shutil.copy(SEG, data / "ct.seg.nrrd")
    synthetic_case(data, "mr")
    (data / "box.json").write_text(json.dumps(
        {"coordinates": "voxel", "objects": [{"name": "lesion", "box": [[6, 5, 2], [14, 12, 5]]}]}))
    rows = [{"id": "chest", "image": "data/ct.nrrd", "labels": "data/ct.seg.nrrd"},
            {"id": "mr", "image": "data/mr.nii.gz", "labels": "data/mr_labels.nii.gz"},
            {"id": "mr_box", "image": "data/mr.nii.gz", "prompts": "data/box.json"},
            {"id": "broken", "image": "data/missing.nii.gz", "labels": "data/mr_labels.nii.gz"}]
    return write_manifest(tmp_path, rows)


def read_summary(out):
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_local_ray_cohort_with_test_engine_and_resume(cohort_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(cohort_folder), "-o", str(out), "--test-engine", "--workers", "2",
                 "--threads", "1"]) == 0
    rows = read_summary(out)
    by_case = {}
    for r in rows:
        by_case.setdefault(r["id"], []).append(r)
    assert sorted(by_case) == ["broken", "chest", "mr", "mr_box"]
    assert [r["status"] for r in by_case["broken"]] == ["failed"]
    assert "does not exist" in by_case["broken"][0]["message"]
    assert len(by_case["chest"]) == 7 and len(by_case["mr"]) == 2 and len(by_case["mr_box"]) == 1
    # Each case's result equals the same case run on its own.
    single = tmp_path / "single"
    assert main(["segment", str(tmp_path / "data" / "mr.nii.gz"), "--from-labels",
                 str(tmp_path / "data" / "mr_labels.nii.gz"), "-o", str(single), "--test-engine"]) == 0
    alone = json.loads((single / "report.json").read_text(encoding="utf-8"))
    for obj, row in zip(alone["objects"], by_case["mr"]):
        assert float(row["dice"]) == pytest.approx(obj["metrics"]["dice"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mr" / "mr_labels.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(alone["outputs"]["label_map"])))
    summary = json.loads((out / "cohort_summary.json").read_text(encoding="utf-8"))
    assert summary["ok"] == 3 and [f["id"] for f in summary["failed"]] == ["broken"]
    dices = [float(r["dice"]) for r in rows if r["dice"]]
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert summary["metrics"]["dice"]["median"] == pytest.approx(np.median(dices))
    worst = [w["dice"] for w in summary["worst_first"] if w["dice"] is not None]
    assert worst == sorted(worst)
    capsys.readouterr()

    # Again: finished cases are skipped (their files untouched), the failed one is tried again.
    stamp = (out / "chest" / "report.json").stat().st_mtime_ns
    assert main(["batch", str(cohort_folder), "-o", str(out), "--test-engine", "--workers", "2"]) == 0
    summary = json.loads((out / "cohort_summary.json").read_text(encoding="utf-8"))
    assert (summary["ok"], summary["skipped"], len(summary["failed"])) == (0, 3, 1)
    assert (out / "chest" / "report.json").stat().st_mtime_ns == stamp
    # A changed option changes the result, so nothing is skipped.
    assert main(["batch", str(cohort_folder), "-o", str(out), "--test-engine", "--nsd-tolerance-mm", "3",
                 "--no-ray"]) == 0
    assert json.loads((out / "cohort_summary.json").read_text(encoding="utf-8"))["ok"] == 3


def test_bad_manifest_is_one_sentence(tmp_path, capsys):
    path = write_manifest(tmp_path, [{"id": "a", "image": "x.nii"}], columns=("id", "image"))
    assert main(["batch", str(path), "--test-engine"]) == 2
    err = capsys.readouterr().err
    assert "\"prompts\" or \"labels\" column" in err and "Traceback" not in err
    path = write_manifest(tmp_path, [{"id": "a", "image": "x.nii", "labels": "l"}] * 2)
    assert main(["batch", str(path), "--test-engine"]) == 2
    assert "repeated" in capsys.readouterr().err


def test_spreadsheet_manifest_with_a_bom_and_capitals_from_another_folder(tmp_path, monkeypatch):
    """Excel writes "\ufeffID,Image,Labels"; the paths stay relative to the manifest, not to where we run."""
    (tmp_path / "data").mkdir()
    synthetic_case(tmp_path / "data", "mr")
    (tmp_path / "cohort.csv").write_text("\ufeffID,Image, Labels\r\nmr1,data/mr.nii.gz,data/mr_labels.nii.gz\r\n",
                                         encoding="utf-8")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert main(["batch", "../cohort.csv", "-o", "out", "--test-engine", "--no-ray"]) == 0
    (row_1, row_2) = read_summary(tmp_path / "run" / "out")
    assert (row_1["id"], row_1["status"], row_2["status"]) == ("mr1", "ok", "ok")


def test_one_gpu_per_worker_where_the_cluster_has_gpus():
    import ray

    assert cohort.worker_resources(2, 0) == {"num_cpus": 2, "num_gpus": 0}
    assert cohort.worker_resources(1, 4) == {"num_cpus": 1, "num_gpus": 1}
    ray.init(address="local", num_cpus=2, num_gpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    try:  # Ray hands out the two (declared) GPUs one to each worker
        actors, resources = cohort.start_workers(cohort.ModelSpec(test_engine=True), 2, 1)
        assert resources == {"num_cpus": 1, "num_gpus": 1}
        ids = [ray.get(a.gpu_ids.remote()) for a in actors]
        assert sorted(len(i) for i in ids) == [1, 1] and ids[0] != ids[1]
    finally:
        ray.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_runs_on_an_existing_cluster(cohort_folder, tmp_path):
    """The cluster was started in another folder: relative manifest, case and output paths still mean the
    driver's (the workers run wherever `ray start` ran).

    Head and driver are processes of their own that opt out of Ray's token auth together: the token lives in one
    file per user (~/.ray), which other Ray clusters of this user replace, and a process keeps the auth mode it
    first saw, so this test's own process stays as the other tests have it."""
    port = free_port()
    ray_cli = pathlib.Path(sys.executable).parent / "ray"
    (tmp_path / "elsewhere").mkdir()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=tmp_path / "elsewhere")
    try:
        out = tmp_path / "out"
        for _ in range(30):  # the head is up when a client can connect
            run = subprocess.run([sys.executable, "-m", "medsam2_backend.cli", "batch", cohort_folder.name,
                                  "-o", "out", "--test-engine", "--workers", "1", "--ray-address",
                                  f"127.0.0.1:{port}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 encoding="utf-8") if head.poll() is None else None
            if run is not None and run.returncode == 0:
                break
            time.sleep(1)
        assert run is not None and run.returncode == 0, run and run.stderr[-2000:]
        summary = json.loads((out / "cohort_summary.json").read_text(encoding="utf-8"))
        assert summary["ok"] == 3 and len(summary["failed"]) == 1, summary["failed"]
        assert (out / "chest" / "report.json").exists() and not (tmp_path / "elsewhere" / "out").exists()
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)


def test_killed_run_resumes_without_redoing_finished_cases(tmp_path):
    rows = [{"id": f"chest{n}", "image": CT, "labels": SEG} for n in range(6)]
    manifest = write_manifest(tmp_path, rows, columns=("id", "image", "labels"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medsam2_backend.cli", "batch", str(manifest), "-o", str(out),
               "--test-engine", "--no-ray"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("*/report.json")) and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    run.kill()
    run.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/report.json")}
    assert 0 < len(finished) < 6, "the kill should land between the first and the last case"
    assert subprocess.run(command, capture_output=True).returncode == 0
    summary = json.loads((out / "cohort_summary.json").read_text(encoding="utf-8"))
    assert summary["skipped"] == len(finished) and summary["ok"] == 6 - len(finished)
    for case, stamp in finished.items():
        assert (out / case / "report.json").stat().st_mtime_ns == stamp
    assert len(list(out.glob("*/report.json"))) == 6


@pytest.mark.sam2
def test_ray_cohort_with_random_sam2_weights(tmp_path):
    """SAM-2 with random weights through a Ray worker, on 6 slices of CTChest4 and its right lung only."""
    ct, seg = sitk.ReadImage(CT), sitk.ReadImage(SEG)
    sitk.WriteImage(ct[:, :, 14:20], str(tmp_path / "ct6.nrrd"))
    sitk.WriteImage(seg[:, :, 14:20], str(tmp_path / "seg6.nrrd"))
    manifest = write_manifest(tmp_path, [{"id": "chest", "image": "ct6.nrrd", "labels": "seg6.nrrd"}],
                              columns=("id", "image", "labels"))
    out = tmp_path / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--random-weights", "--label-values", "5",
                 "--preset", "lung", "--workers", "1", "--threads", "2"]) == 0
    report = json.loads((out / "chest" / "report.json").read_text(encoding="utf-8"))
    assert report["model"]["random_weights"] and report["model"]["checkpoint"] == "random weights"
    obj = report["objects"][0]
    assert obj["name"] == "label 5" and 0 <= obj["metrics"]["dice"] <= 1
    assert len(obj["predicted_iou"]) == 6
    labels = sitk.ReadImage(report["outputs"]["label_map"])
    assert labels.GetSize() == (128, 128, 6)
    np.testing.assert_allclose(labels.GetOrigin(), ct[:, :, 14:20].GetOrigin(), atol=1e-4)
    names = [s["name"] for s in slicerio.read_segmentation(report["outputs"]["seg_nrrd"])["segments"]]
    assert names == ["label 5 (random weights)"]


def test_a_worker_that_cannot_start_is_one_sentence(cohort_folder, tmp_path, capsys):
    """A model that fails inside the Ray worker ends the run with a sentence, not a Ray traceback."""
    from medsam2_backend.batch.errors import CohortError

    cases = cohort.read_manifest(cohort_folder)
    with pytest.raises(CohortError, match="A Ray worker could not start.*Unknown device 'nonsense'"):
        cohort.run_cohort(cases, tmp_path / "out", cohort.CaseOptions(),
                          cohort.ModelSpec(random_weights=True, device="nonsense"), progress=False)
    assert main(["batch", str(cohort_folder), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "neither a file nor a known name" in capsys.readouterr().err
