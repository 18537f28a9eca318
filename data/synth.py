"""Synthetic demo data: PIL-rendered scenes of coloured shapes, grammar captions, held-out colour×shape pairs.

Every scene has 1-3 objects (colour, shape, size, one of 9 grid positions) on a plain background. Each
image gets 5 captions in different phrasings; every caption names every object's colour and shape, and
most add its size, position or the background, so a good model can tell scenes apart. Test scenes each
contain at least one colour×shape pair from HELD_OUT, which never appears in training, so test recall
measures compositional generalization rather than memorization. Deterministic given the seed: scenes,
captions, renders and boxes bit for bit; features up to float16 rounding, since the extractor picks its
CPU thread count by speed (data/features.py) and convolutions round differently with 1 or 2 threads.

`relations=True` writes the relations set instead (`ldot data synth --relations`), whose scenes a bag of
words cannot tell apart: every scene holds two objects of different colours and shapes, and comes right
after its twin, the same two objects with their places swapped (the relation reversed) or with their
colours swapped (the binding reversed). Its captions name both objects and how they stand to each other
("a red circle to the left of a blue square") but no place in the image and no size, so a scene and its
twin have captions of the same words in another order, and only which colour goes with which shape, and
which object stands where, tells the two apart: what a cross-attention re-ranker checks word by region
and a dot product of two [CLS] vectors has to fold into one vector first. The held-out pairs rule holds
as in the default set (every test scene, twins included, shows one).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldot.data.features import EfficientNetLite0Grid, thumbnail_jpeg
from ldot.data.writer import DatasetWriter

COLORS = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.075, "large": 0.145}  # half-extent as a fraction of the image side
BACKGROUNDS = {"white": (240, 240, 240), "gray": (125, 125, 125), "black": (18, 18, 18)}
# Test-only colour×shape pairs: one per colour, and every shape still seen in training with other colours.
HELD_OUT = (("red", "triangle"), ("green", "star"), ("blue", "circle"), ("yellow", "cross"), ("purple", "square"),
            ("orange", "star"))
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
POSITION_PHRASE = {
    ("top", "left"): "at the top left", ("top", "center"): "at the top", ("top", "right"): "at the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
IMAGE_SIZE = 224  # the feature extractor's input: rendering at it avoids a resize


@dataclasses.dataclass
class Obj:
    color: str
    shape: str
    size: str
    row: int
    col: int
    cx: float  # centre, normalized
    cy: float

    @property
    def where(self) -> str:
        return POSITION_PHRASE[(ROWS[self.row], COLS[self.col])]


@dataclasses.dataclass
class Scene:
    background: str
    objects: list[Obj]

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [dataclasses.asdict(o) for o in self.objects]}


# ------------------------------------------------------------------------------------------------ scenes

_TRAIN_PAIRS = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]


def _place_objects(rng: np.random.Generator, pairs, cells) -> list[Obj]:
    """Objects of the given colour x shape pairs in the given grid cells, jittered, of random sizes."""
    objects = []
    for cell, (color, shape) in zip(cells, pairs):
        row, col = divmod(int(cell), 3)
        jitter = rng.uniform(-0.05, 0.05, size=2)
        size = ("small", "large")[int(rng.integers(0, 2))]
        objects.append(Obj(color, shape, size, row, col, (col + 0.5) / 3 + jitter[0], (row + 0.5) / 3 + jitter[1]))
    return objects


def make_scene(rng: np.random.Generator, split: str) -> Scene:
    n = int(rng.integers(1, 4))
    cells = rng.choice(9, size=n, replace=False)
    pairs = [_TRAIN_PAIRS[i] for i in rng.integers(0, len(_TRAIN_PAIRS), size=n)]
    if split == "test":  # at least one held-out pair; the others may be anything
        pairs[int(rng.integers(0, n))] = HELD_OUT[int(rng.integers(0, len(HELD_OUT)))]
        for i in range(n):
            if rng.random() < 0.3:
                pairs[i] = HELD_OUT[int(rng.integers(0, len(HELD_OUT)))]
    objects = _place_objects(rng, pairs, cells)
    background = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    return Scene(background, objects)


def make_relation_twins(rng: np.random.Generator, split: str) -> tuple[Scene, Scene]:
    """A scene of two objects (different colours, different shapes) and its twin: the same objects with their
    places swapped, or with their colours swapped; both obey the split's held-out rule."""
    swap_places = bool(rng.integers(0, 2))
    while True:  # rejection: a few draws at most (24 of the 30 pairs are training pairs)
        colors = rng.choice(list(COLORS), size=2, replace=False)
        shapes = rng.choice(SHAPES, size=2, replace=False)
        pairs = [(str(colors[0]), str(shapes[0])), (str(colors[1]), str(shapes[1]))]
        twin_pairs = pairs if swap_places else [(pairs[1][0], pairs[0][1]), (pairs[0][0], pairs[1][1])]
        held = [sum(p in HELD_OUT for p in ps) for ps in (pairs, twin_pairs)]
        if (split == "test" and min(held) > 0) or (split != "test" and max(held) == 0):
            break
    cells = rng.choice(9, size=2, replace=False)
    background = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    scene = Scene(background, _place_objects(rng, pairs, cells))
    if swap_places:
        twin = [dataclasses.replace(o, row=p.row, col=p.col, cx=p.cx, cy=p.cy)
                for o, p in zip(scene.objects, scene.objects[::-1])]
    else:
        twin = [dataclasses.replace(o, color=c) for o, (c, _) in zip(scene.objects, twin_pairs)]
    return scene, Scene(background, twin)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.cx * size, o.cy * size, SIZES[o.size] * size
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
        elif o.shape == "star":
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else r * 0.42
                a = -math.pi / 2 + k * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            draw.polygon(pts, fill=fill)
        elif o.shape == "cross":
            w = r * 0.34
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image


# ------------------------------------------------------------------------------------------------ captions


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def relation(a: Obj, b: Obj) -> str:
    """How a stands to b, as the captions say it: by column first, else by row (the cells differ)."""
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def _templates(scene: Scene, rng: np.random.Generator) -> list[str]:
    objs = list(scene.objects)
    order = [objs[i] for i in rng.permutation(len(objs))]
    bg, n = scene.background, len(objs)
    full = [f"a {o.size} {o.color} {o.shape} {o.where}" for o in order]
    plain = [f"a {o.color} {o.shape}" for o in order]
    sized = [f"a {o.size} {o.color} {o.shape}" for o in order]
    out = [
        f"{_join(full)}, {bg} background",
        f"{COUNT_WORDS[n]} shape{'s' if n > 1 else ''} on {bg}: {_join(sized)}",
        f"a {bg} picture showing {_join([f'a {o.color} {o.shape} {o.where}' for o in order])}",
        f"there is {_join(sized)} on a {bg} background" if n > 1 else f"there is {sized[0]} {order[0].where}",
        f"{_join(plain)} {'are' if n > 1 else 'is'} drawn on a plain {bg} background",
    ]
    if n == 1:
        o = order[0]
        out += [f"a single {o.color} {o.shape}, {o.size}, {o.where} of a {bg} image",
                f"one {o.size} {o.shape} colored {o.color} {o.where}"]
    else:
        a, b = order[0], order[1]
        rest = f" and {_join(full[2:])}" if n > 2 else ""
        out += [f"a {a.color} {a.shape} {relation(a, b)} a {b.color} {b.shape}{rest}, on {bg}",
                f"{_join([f'{o.color} {o.shape} ({o.size}, {ROWS[o.row]} {COLS[o.col]})' for o in order])}"]
    return out


# which of the two an object is, by the relation: relative to the other object, never a place in the image
_SIDE = {"to the left of": "on the left", "to the right of": "on the right", "above": "higher up", "below": "lower down"}


def _relation_templates(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Phrasings that name both objects and their relation, never a place in the image or a size (module doc)."""
    a, b = (scene.objects[i] for i in rng.permutation(2))
    bg, ab, ba = scene.background, relation(a, b), relation(b, a)
    return [
        f"a {a.color} {a.shape} {ab} a {b.color} {b.shape}",
        f"a {b.color} {b.shape} {ba} a {a.color} {a.shape} on a {bg} background",
        f"on {bg}, the {a.color} {a.shape} is {ab} the {b.color} {b.shape}",
        f"two shapes: a {b.color} {b.shape} {ba} a {a.color} {a.shape}",
        f"a {a.color} {a.shape} and a {b.color} {b.shape}, the {a.shape} {_SIDE[ab]}",
        f"the {a.shape} is {a.color}, the {b.shape} is {b.color}, and the {b.shape} is {ba} the {a.shape}",
    ]


def captions(scene: Scene, rng: np.random.Generator, k: int = 5, relations: bool = False) -> list[str]:
    """k distinct phrasings of one scene, picked from the grammar's templates."""
    options = (_relation_templates if relations else _templates)(scene, rng)
    picked = rng.choice(len(options), size=k, replace=False)
    return [options[i] for i in sorted(picked)]


# ------------------------------------------------------------------------------------------------ writing


def make_scenes(rng: np.random.Generator, split: str, n: int, relations: bool = False) -> list[Scene]:
    """n scenes of a split; of the relations set, twins side by side (an odd n ends with a twin left out)."""
    if not relations:
        return [make_scene(rng, split) for _ in range(n)]
    return [s for _ in range((n + 1) // 2) for s in make_relation_twins(rng, split)][:n]


def write_split(out_dir: Path, split: str, n: int, seed: int, extractor: EfficientNetLite0Grid, *, shard_size: int,
                overwrite: bool, progress: bool | None, relations: bool = False) -> None:
    # One generator per split, so the train set does not change when --test-images does.
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
    scenes = make_scenes(rng, split, n, relations)
    caps = [captions(s, rng, relations=relations) for s in scenes]
    images = (render(s) for s in scenes)
    thumbs: list[bytes] = []

    def with_thumbs():
        for img in images:
            thumbs.append(thumbnail_jpeg(img))
            yield img

    extra = {"held_out": [list(p) for p in HELD_OUT], "seed": seed, "backbone": extractor.name,
             "kind": "relations" if relations else "scenes"}
    with DatasetWriter(out_dir / split, feature_dim=extractor.feature_dim,
                       class_dim=extractor.class_dim if extractor.with_cls else None, source="synth", split=split,
                       shard_size=shard_size, extra=extra, overwrite=overwrite) as writer:
        for i, (feat, box, cls) in enumerate(extractor.extract(with_thumbs(), total=n, desc=f"synth {split}",
                                                               progress=progress)):
            meta = {"image_id": f"synth-{split}-{i:06d}", "captions": caps[i], "split": split, "source": "synth",
                    "scene": scenes[i].to_json()}
            writer.write(feat, box, meta, cls=cls, thumb=thumbs[i])


def synth(out: str | Path, *, images: int = 1000, test_images: int = 200, seed: int = 0, with_cls: bool = False,
          shard_size: int = 250, overwrite: bool = False, progress: bool | None = None, relations: bool = False) -> dict:
    """Write ``out/train`` and ``out/test`` (the relations set where `relations`); returns wall-time figures."""
    out = Path(out)
    t0 = time.perf_counter()
    extractor = EfficientNetLite0Grid(with_cls=with_cls)
    timings = {}
    for split, n in (("train", images), ("test", test_images)):
        t = time.perf_counter()
        write_split(out, split, n, seed, extractor, shard_size=shard_size, overwrite=overwrite, progress=progress,
                    relations=relations)
        timings[split] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return timings
