"""``phantom``: a procedurally generated, seeded Med-VQA dataset that needs no download.

Each image is an axial slice of a head, chest or abdomen: a body outline, organs drawn as soft
ellipses with modality-specific intensities, and 0-3 lesions of varying size, position and contrast.
Two domains share anatomy and questions but not appearance, so transfer can be measured:

  ``ct``: non-contrast or contrast-enhanced CT: bright bone, dark fat, sharp edges, fine white noise.
  ``mr``: T1- or T2-weighted MRI: bright fat, dark bone, fluid dark (T1) or bright (T2), a smooth
          coil bias field, blur and Rician noise.

Questions come from a fixed vocabulary, half closed (yes/no) and half open (count, modality, body
part, organ, side, size), and every answer is read off the drawn scene, so a model that sees the
image can beat the majority answer by a wide margin. Each record also carries a short radiology
report (``extra["report"]``) and the planted findings (``extra["findings"]``).

Sides follow the radiological convention: the patient's left is on the image's right.
Generation is deterministic: (seed, domain, split, image index) fixes the scene and its pixels; train
and test draw from different streams, so their images are disjoint. Images are rendered lazily (the
record's ``image`` is a picklable callable), at several hundred images per second at 64 px.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from .records import DatasetSpec, VQARecord

if TYPE_CHECKING:  # PIL is imported where images are read (help and listings never import it)
    from PIL import Image

DOMAINS = {"ct": ("non-contrast ct", "contrast ct"), "mr": ("t1 mri", "t2 mri")}
_DOMAIN_CODE = {"ct": 1, "mr": 2}
_SPLIT_CODE = {"train": 0, "test": 1}
DEFAULT_IMAGES = {"train": 800, "test": 300}  # 1,200 test questions: a 95% interval of about +-0.028 on ACC
_DISPLAY = {"non-contrast ct": "non-contrast CT", "contrast ct": "contrast-enhanced CT",
            "t1 mri": "T1-weighted MRI", "t2 mri": "T2-weighted MRI"}

# Tissue intensity in [0, 1] per modality.
_TISSUE = {
    #                    air   fat   soft  bone  lung  fluid liver spleen kidney brain heart
    "non-contrast ct": (0.00, 0.22, 0.45, 0.95, 0.07, 0.38, 0.55, 0.50, 0.48, 0.50, 0.44),
    "contrast ct":     (0.00, 0.22, 0.47, 0.95, 0.07, 0.38, 0.68, 0.72, 0.85, 0.56, 0.80),
    "t1 mri":          (0.02, 0.90, 0.40, 0.10, 0.04, 0.12, 0.58, 0.40, 0.45, 0.62, 0.08),
    "t2 mri":          (0.02, 0.72, 0.33, 0.08, 0.04, 0.95, 0.28, 0.60, 0.62, 0.45, 0.12),
}
_TISSUES = ("air", "fat", "soft", "bone", "lung", "fluid", "liver", "spleen", "kidney", "brain", "heart")

# Body outline semi-axes (fraction of half the image width) per region.
_BODY = {"head": (0.60, 0.74), "chest": (0.86, 0.62), "abdomen": (0.84, 0.66)}

# (name, tissue, cx, cy, ax, ay) in body coordinates (the body ellipse is the unit disc; x to the image
# right = patient left). Hosts can carry lesions: name -> (organ, side).
_STRUCTURES = {
    "head": [("skull-inner", "brain", 0, 0, 0.88, 0.90), ("right ventricle", "fluid", -0.14, -0.05, 0.09, 0.24),
             ("left ventricle", "fluid", 0.14, -0.05, 0.09, 0.24), ("falx", "fluid", 0, 0, 0.015, 0.85)],
    "chest": [("right lung", "lung", -0.47, -0.08, 0.36, 0.66), ("left lung", "lung", 0.47, -0.08, 0.34, 0.66),
              ("heart", "heart", 0.12, 0.18, 0.30, 0.34), ("spine", "bone", 0, 0.78, 0.13, 0.16)],
    "abdomen": [("liver", "liver", -0.40, -0.22, 0.46, 0.42), ("spleen", "spleen", 0.52, -0.25, 0.24, 0.30),
                ("right kidney", "kidney", -0.36, 0.42, 0.20, 0.26),
                ("left kidney", "kidney", 0.36, 0.42, 0.20, 0.26), ("spine", "bone", 0, 0.74, 0.14, 0.15)],
}
_HOSTS = {
    "head": {"right hemisphere": ("brain", "right", -0.42, 0.0, 0.34, 0.62),
             "left hemisphere": ("brain", "left", 0.42, 0.0, 0.34, 0.62)},
    "chest": {"right lung": ("lung", "right", -0.47, -0.08, 0.36, 0.66),
              "left lung": ("lung", "left", 0.47, -0.08, 0.34, 0.66)},
    "abdomen": {"liver": ("liver", "right", -0.40, -0.22, 0.46, 0.42),
                "spleen": ("spleen", "left", 0.52, -0.25, 0.24, 0.30),
                "right kidney": ("kidney", "right", -0.36, 0.42, 0.20, 0.26),
                "left kidney": ("kidney", "left", 0.36, 0.42, 0.20, 0.26)},
}
_HOST_TISSUE = {"right hemisphere": "brain", "left hemisphere": "brain", "right lung": "lung", "left lung": "lung",
                "liver": "liver", "spleen": "spleen", "right kidney": "kidney", "left kidney": "kidney"}
# Lesion radius ranges (fraction of half the image width) and the field of view that turns them into cm.
_SIZES = {"small": (0.060, 0.080), "medium": (0.100, 0.125), "large": (0.150, 0.180)}
_FOV_CM = 40.0
_LESION_COUNTS = (0, 1, 2, 3)
_LESION_COUNT_P = (0.40, 0.35, 0.15, 0.10)


@dataclass(frozen=True)
class Lesion:
    host: str
    organ: str
    side: str
    x: float  # centre, image coordinates in [-1, 1]
    y: float
    radius: float  # fraction of half the image width
    aspect: float
    size_class: str
    contrast: float  # signed intensity change (> 0: brighter than the host)

    @property
    def size_cm(self) -> float:
        return round(self.radius * _FOV_CM, 1)  # diameter = 2r half-widths = r * FOV


@dataclass(frozen=True)
class Scene:
    region: str
    modality: str
    domain: str
    body: tuple[float, float, float, float]  # cx, cy, ax, ay (image coordinates)
    structures: tuple[tuple[str, str, float, float, float, float, float], ...]  # name, tissue, cx, cy, ax, ay, angle
    hosts: tuple[tuple[str, float, float, float, float], ...]  # name, cx, cy, ax, ay (image coordinates)
    lesions: tuple[Lesion, ...]
    gain: float
    offset: float


def _to_image(body, bx, by, bax, bay):
    cx, cy, ax, ay = body
    return cx + bx * ax, cy + by * ay, bax * ax, bay * ay


def sample_scene(rng: np.random.Generator, domain: str) -> Scene:
    """Draw the anatomy, modality and lesions of one image (no pixels yet)."""
    region = ("head", "chest", "abdomen")[rng.integers(3)]
    modality = DOMAINS[domain][rng.integers(2)]
    scale = rng.uniform(0.92, 1.06)
    body = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), _BODY[region][0] * scale, _BODY[region][1] * scale)
    structures = []
    for name, tissue, bx, by, bax, bay in _STRUCTURES[region]:
        jit = lambda s: rng.uniform(-s, s)  # noqa: E731
        cx, cy, ax, ay = _to_image(body, bx + jit(0.04), by + jit(0.04), bax * (1 + jit(0.1)), bay * (1 + jit(0.1)))
        structures.append((name, tissue, cx, cy, ax, ay, jit(0.12) if name not in ("falx", "skull-inner") else 0.0))
    hosts = tuple((h, *_to_image(body, *geo[2:])) for h, geo in _HOSTS[region].items())

    lesions = []
    for _ in range(rng.choice(_LESION_COUNTS, p=_LESION_COUNT_P)):
        host, hx, hy, hax, hay = hosts[rng.integers(len(hosts))]
        organ, side = _HOSTS[region][host][:2]
        fitting = [s for s, (lo, _) in _SIZES.items() if lo <= 0.6 * min(hax, hay)] or ["small"]
        size_class = fitting[rng.integers(len(fitting))]
        radius = rng.uniform(*_SIZES[size_class])
        # centre inside the host, far enough from its edge that most of the lesion lies within it
        theta, rho = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 1))
        sx, sy = max(hax - radius, 0.25 * hax), max(hay - radius, 0.25 * hay)
        contrast = rng.choice((-1.0, 1.0)) * rng.uniform(0.22, 0.40)
        host_level = _TISSUE[modality][_TISSUES.index(_HOST_TISSUE[host])]
        if not 0.05 <= host_level + contrast <= 0.95:
            contrast = -contrast  # a dark lesion in an air-filled lung would be invisible: make it dense
        lesions.append(Lesion(host, organ, side, hx + rho * sx * math.cos(theta), hy + rho * sy * math.sin(theta),
                              radius, rng.uniform(0.8, 1.25), size_class, float(contrast)))
    return Scene(region, modality, domain, body, tuple(structures), hosts, tuple(lesions),
                 gain=rng.uniform(0.92, 1.08), offset=rng.uniform(-0.03, 0.03))


def _ellipse(u, v, cx, cy, ax, ay, angle, px):
    """Anti-aliased coverage (0..1) of an ellipse; ``px`` is the pixel size in image units."""
    c, s = math.cos(angle), math.sin(angle)
    du, dv = u - cx, v - cy
    ru, rv = (c * du + s * dv) / ax, (-s * du + c * dv) / ay
    dist = np.sqrt(ru * ru + rv * rv)
    # first-order signed distance to the outline, (1 - d) / |grad d|, so thin ellipses stay thin
    grad = np.sqrt((ru / ax) ** 2 + (rv / ay) ** 2) / np.maximum(dist, 1e-6)
    return np.clip((1.0 - dist) / (np.maximum(grad, 1e-6) * px) + 0.5, 0.0, 1.0)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge-padded), small enough not to need scipy."""
    r = max(1, math.ceil(2 * sigma))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w = (w / w.sum()).astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        padded = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        img = sum(wk * np.take(padded, np.arange(k, k + n), axis=axis) for k, wk in enumerate(w))
    return img


def render(scene: Scene, size: int, noise_seed: tuple[int, ...]) -> np.ndarray:
    """The scene as a float32 (size, size) image in [0, 1]."""
    rng = np.random.default_rng(list(noise_seed))
    tissue = dict(zip(_TISSUES, _TISSUE[scene.modality]))
    px = 2.0 / size
    coords = (np.arange(size, dtype=np.float32) + 0.5) * px - 1.0
    u, v = np.meshgrid(coords, coords)  # u: columns (x), v: rows (y)
    img = np.full((size, size), tissue["air"], np.float32)

    def paint(value, cover):
        nonlocal img
        img = img + (value - img) * cover

    cx, cy, ax, ay = scene.body
    if scene.region == "head":
        paint(tissue["bone"], _ellipse(u, v, cx, cy, ax, ay, 0.0, px))  # skull
    else:
        paint(tissue["fat"], _ellipse(u, v, cx, cy, ax, ay, 0.0, px))  # subcutaneous fat
        paint(tissue["soft"], _ellipse(u, v, cx, cy, ax * 0.9, ay * 0.88, 0.0, px))
        if scene.region == "chest":  # ribs: a dashed bony ring inside the wall
            ring = _ellipse(u, v, cx, cy, ax * 0.86, ay * 0.84, 0.0, px) * (
                1 - _ellipse(u, v, cx, cy, ax * 0.80, ay * 0.78, 0.0, px))
            dashes = (np.cos(np.arctan2(v - cy, u - cx) * 14) > 0.2).astype(np.float32)
            paint(tissue["bone"], ring * dashes)
    for _, kind, scx, scy, sax, say, angle in scene.structures:
        paint(tissue[kind], _ellipse(u, v, scx, scy, sax, say, angle, px))
    for les in scene.lesions:
        cover = _ellipse(u, v, les.x, les.y, les.radius * les.aspect, les.radius / les.aspect, 0.0, px)
        img = img + les.contrast * cover
    img = img * scene.gain + scene.offset

    if scene.domain == "mr":
        a, b, c = rng.uniform(-0.25, 0.25, 3)
        img = img * (1.0 + a * u + b * v + c * u * v)  # receive-coil bias field
        img = _blur(img, sigma=0.7 * size / 64)  # MR's lower in-plane resolution
        sigma = 0.035
        img = np.sqrt((img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)
    else:
        img = img + rng.normal(0, 0.03, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_image(scene: Scene, size: int, noise_seed: tuple[int, ...]) -> Image.Image:
    """``render`` as an RGB PIL image (grey replicated), what ``VQARecord.image()`` returns."""
    from PIL import Image

    grey = (render(scene, size, noise_seed) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


# ---- questions -------------------------------------------------------------------------------------
def _same(values):
    return len(set(values)) == 1


def _closed_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question, answer, question_type) candidates answerable with yes/no for this scene."""
    les, yes_no = scene.lesions, lambda b: "yes" if b else "no"  # noqa: E731
    hosts = [h[0] for h in scene.hosts]
    # half the time ask about a lesioned structure, so "yes" is not rare
    host = les[rng.integers(len(les))].host if les and rng.random() < 0.5 else hosts[rng.integers(len(hosts))]
    modality = DOMAINS[scene.domain][rng.integers(2)]
    region = scene.region if rng.random() < 0.5 else ("head", "chest", "abdomen")[rng.integers(3)]
    out = [
        ("Is there an abnormality in this image?", yes_no(les), "ABN") if rng.random() < 0.5
        else ("Is this image normal?", yes_no(not les), "ABN"),
        (f"Is there a lesion in the {host}?", yes_no(any(l.host == host for l in les)), "PRES"),
        (f"Is this a {modality} image?", yes_no(modality == scene.modality), "MODALITY"),
        (f"Is this an image of the {region}?", yes_no(region == scene.region), "ORGAN"),
        ("Is there more than one lesion?", yes_no(len(les) > 1), "COUNT"),
    ]
    if les and _same(l.side for l in les):
        side = ("left", "right")[rng.integers(2)]
        subject = "Is the lesion" if len(les) == 1 else "Are the lesions"
        out.append((f"{subject} on the {side} side?", yes_no(les[0].side == side), "POS"))
    if len(les) == 1:
        out.append(("Is the lesion brighter than the surrounding tissue?", yes_no(les[0].contrast > 0), "ATTRIB"))
    return out


def _open_questions(scene: Scene) -> list[tuple[str, str, str]]:
    les = scene.lesions
    out = [
        ("How many lesions are there?", str(len(les)), "COUNT"),
        ("What imaging modality was used?", scene.modality, "MODALITY"),
        ("What part of the body is shown?", scene.region, "ORGAN"),
    ]
    if les and _same(l.organ for l in les):
        out.append(("Which organ is abnormal?", les[0].organ, "ORGAN"))
    if les and _same(l.side for l in les):
        out.append(("Which side is the lesion on?" if len(les) == 1 else "Which side are the lesions on?",
                    les[0].side, "POS"))
    if len(les) == 1:
        out.append(("Where is the lesion?", les[0].host, "POS"))
        out.append(("How large is the lesion?", les[0].size_class, "SIZE"))
    return out


# ---- report ----------------------------------------------------------------------------------------
def _where(les: Lesion, scene: Scene) -> str:
    _, hx, hy, hax, hay = next(h for h in scene.hosts if h[0] == les.host)
    dy = (les.y - hy) / hay
    return "upper part" if dy < -0.3 else "lower part" if dy > 0.3 else "central part"


def findings(scene: Scene) -> dict:
    """The planted findings, JSON-friendly (centres in [0, 1] image fractions, x to the right)."""
    return {
        "region": scene.region, "modality": scene.modality, "domain": scene.domain,
        "lesions": [
            {"host": l.host, "organ": l.organ, "side": l.side, "position": _where(l, scene),
             "center": [round((l.x + 1) / 2, 4), round((l.y + 1) / 2, 4)], "radius": round(l.radius / 2, 4),
             "size_cm": l.size_cm, "size_class": l.size_class,
             "intensity": "hyper" if l.contrast > 0 else "hypo", "contrast": round(l.contrast, 3)}
            for l in scene.lesions
        ],
    }


def report(scene: Scene) -> str:
    """A short structured radiology report: technique, one finding per structure, impression."""
    suffix = "dense" if scene.domain == "ct" else "intense"
    sentences = [f"Technique: axial {_DISPLAY[scene.modality]} of the {scene.region}."]
    by_host: dict[str, list[Lesion]] = {}
    for les in scene.lesions:
        by_host.setdefault(les.host, []).append(les)
    findings_text = []
    for host, *_ in scene.hosts:
        found = by_host.get(host, [])
        if not found:
            findings_text.append(f"The {host} is unremarkable.")
        for les in found:
            kind = ("hyper" if les.contrast > 0 else "hypo") + suffix
            findings_text.append(
                f"There is a {les.size_cm:.1f} cm {kind} {les.size_class} lesion in the {_where(les, scene)} "
                f"of the {host}.")
    sentences.append("Findings: " + " ".join(findings_text))
    if not scene.lesions:
        sentences.append("Impression: no focal lesion.")
    else:
        n = len(scene.lesions)
        where = ", ".join(sorted(by_host))
        sentences.append(f"Impression: {n} focal lesion{'s' if n > 1 else ''} ({where}).")
    return " ".join(sentences)


# ---- the dataset -----------------------------------------------------------------------------------
def _check_int(name: str, value, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"phantom: {name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def load(split: str, data_dir=None, domain: str = "ct", n_images: int | None = None,
         questions_per_image: int = 4, seed: int = 0, image_size: int = 64) -> list[VQARecord]:
    if domain not in DOMAINS:
        raise ConfigError(f"phantom: domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    n_images = DEFAULT_IMAGES[split] if n_images is None else n_images
    _check_int("n_images", n_images, 1, 10_000_000)
    _check_int("questions_per_image", questions_per_image, 1, 12)
    _check_int("seed", seed, 0, 2**63 - 1)
    _check_int("image_size", image_size, 16, 2048)
    key = (seed, _DOMAIN_CODE[domain], _SPLIT_CODE[split])
    records = []
    for i in range(n_images):
        rng = np.random.default_rng([*key, i, 0])
        scene = sample_scene(rng, domain)
        image = functools.partial(render_image, scene, image_size, (*key, i, 1))
        image_id = f"phantom-{domain}-s{seed}-{split}-{i:06d}-{image_size}px"
        closed, opened = _closed_questions(scene, rng), _open_questions(scene)
        n_closed = min(len(closed), (questions_per_image + 1) // 2)
        n_open = min(len(opened), questions_per_image - n_closed)
        chosen = [(c, "CLOSED") for c in _pick(closed, n_closed, rng)] + [(o, "OPEN") for o in _pick(opened, n_open, rng)]
        extra = {"report": report(scene), "findings": findings(scene), "domain": domain, "modality": scene.modality}
        for j, ((question, answer, qtype), atype) in enumerate(chosen):
            records.append(VQARecord(
                qid=f"phantom-{domain}-s{seed}-{split}-{i:06d}-{j}", question=question, answer=answer,
                answer_type=atype, image=image, image_id=image_id, question_type=qtype, organ=scene.region,
                extra=extra,
            ))
    return records


def _pick(items: list, k: int, rng: np.random.Generator) -> list:
    return [items[j] for j in sorted(rng.permutation(len(items))[:k].tolist())]


SPEC = DatasetSpec(
    name="phantom",
    description="generated, seeded Med-VQA phantoms (head/chest/abdomen, lesions; domains ct and mr); no download",
    load=load,
    splits=("train", "test"),
    needs_data_dir=False,
    options={"domain": "ct (source) or mr (target)", "n_images": "images in the split (train 800, test 300)",
             "questions_per_image": "questions per image (default 4, half closed)", "seed": "random seed (0)",
             "image_size": "generated image side in pixels (64)"},
    # a tiny backbone from random weights learns little in a short budget, so the bench's default is
    # to pretrain it fully on one domain and compare the methods adapting it to the other
    transfer=({"domain": "ct"}, {"domain": "mr"}),
)
