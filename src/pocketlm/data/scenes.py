"""Image-text data for vision-language students: rendered shape scenes with exact text, and users' own folders.

**Shape scenes** (the embedded data, no download). A scene is one to ``max_shapes`` shapes (circle, square,
triangle) of a colour and a size on a light background, drawn with PIL. Each shape sits in its own vertical slot,
so "left of" is never ambiguous, and the text is exact by construction:

    caption   "a small red circle left of a large blue square"           (shapes read left to right)
    colour    "what colour is the circle?" → "red"                       (asked of a shape kind seen once)
    count     "how many shapes are there?" → "two"; "how many red shapes are there?" → "one"; "how many circle
              shapes are there?" → "one" (asked of every colour and kind present and of one colour and one kind absent,
              whose answer is "zero")
    position  "is the red circle left or right of the blue square?" → "left"

Everything follows from the seed. Splits are disjoint by construction: every possible scene belongs to exactly
one split, decided by a hash of its full description (kinds, colours, sizes, pixel positions) and the seed, and a
split's generator keeps only the scenes that belong to it — so the splits never share a scene, and a split's
content does not depend on how large the other splits are.

The i.i.d. splits (train, val, test) are disjoint only in pixels: with 6 colours, 3 kinds and 2 sizes the
captions repeat (153 of the 300 test captions of seed 0 occur verbatim among 3,000 training captions, and every
test question with its answer occurs in training). The **compositional split** holds out colour × kind pairs
(``SceneSpec.held_out``, e.g. "red circle"): no train, val or test scene has a shape of a held-out pair, and every
compositional scene has at least one. Its items are those about a held-out shape, whose text training never holds:
the caption (it names the shape), the colour question whose answer is the held-out shape's colour ("what colour is
the circle ?" → "red": the question is a template, but training never gives it that answer), and the position
questions that name the shape. Count questions are left out: their every question-answer pair also occurs in
training, and counting is measured on the i.i.d. test split.

**Folders**: images plus a captions file, COCO-style JSON (``images`` + ``annotations``, several captions per
image) or JSONL (one row per caption or question: ``{"image": "a.png", "caption": "..."}`` or
``{"image": "a.png", "question": "...", "answer": "...", "type": "..."}``). Bad rows are errors naming file
and line, raised before any model work.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from pocketlm.data.text import DataError
from pocketlm.models.images import load_image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
    "yellow": (230, 195, 20), "purple": (135, 55, 175), "orange": (240, 125, 25),
}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 0.09, "large": 0.16}  # radius as a share of the image side
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
SPLITS = ("train", "val", "test")  # i.i.d.: cut from one scene space by a hash
COMPOSITIONAL = "compositional"  # scenes with a held-out colour × kind pair (SceneSpec.held_out)
QUESTION_TYPES = ("colour", "count", "position")
CAPTION_PROMPT = "<image> describe the image ."
QUESTION_PROMPT = "<image> question : {question} answer :"


# ---------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    colour: str
    size: str  # small | large
    x: int  # centre, pixels
    y: int
    radius: int

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str  # one of QUESTION_TYPES
    about: tuple[tuple[str, str], ...] = ()  # the (colour, kind) pairs the question names or answers with


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # left to right
    image_size: int
    background: tuple[int, int, int]

    def key(self) -> str:
        return json.dumps([self.image_size, self.background, [list(vars(s).values()) for s in self.shapes]])

    def caption(self) -> str:
        return " left of ".join(f"a {s.name}" for s in self.shapes)

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.image_size, self.image_size), self.background)
        self._draw(ImageDraw.Draw(img), [COLOURS[s.colour] for s in self.shapes])
        return img

    def mask(self) -> Image.Image:
        """Which shape covers each pixel: 0 for background, i + 1 for shape i (drawn exactly as `render`)."""
        img = Image.new("L", (self.image_size, self.image_size), 0)
        self._draw(ImageDraw.Draw(img), [i + 1 for i in range(len(self.shapes))])
        return img

    def _draw(self, draw: ImageDraw.ImageDraw, fills: list) -> None:
        for s, fill in zip(self.shapes, fills):
            box = (s.x - s.radius, s.y - s.radius, s.x + s.radius, s.y + s.radius)
            if s.kind == "circle":
                draw.ellipse(box, fill=fill)
            elif s.kind == "square":
                r = round(s.radius * 0.85)  # a square of the circle's area would look larger
                draw.rectangle((s.x - r, s.y - r, s.x + r, s.y + r), fill=fill)
            else:
                draw.polygon([(s.x, s.y - s.radius), (s.x - s.radius, s.y + s.radius),
                              (s.x + s.radius, s.y + s.radius)], fill=fill)

    def questions(self) -> list[QA]:
        """Every question the scene answers unambiguously, in a fixed order."""
        out: list[QA] = []
        kinds = [s.kind for s in self.shapes]
        for s in self.shapes:
            if kinds.count(s.kind) == 1:
                out.append(QA(f"what colour is the {s.kind} ?", s.colour, "colour", ((s.colour, s.kind),)))
        out.append(QA("how many shapes are there ?", NUMBERS[len(self.shapes)], "count"))
        rng = random.Random(self.key())
        present = sorted({s.colour for s in self.shapes})
        absent = [c for c in COLOURS if c not in present]
        # every colour present, and one absent (answer "zero"), chosen by the scene itself
        asked = present + ([rng.choice(absent)] if absent else [])
        for colour in asked:
            n = sum(s.colour == colour for s in self.shapes)
            out.append(QA(f"how many {colour} shapes are there ?", NUMBERS[n], "count"))
        present = sorted(set(kinds))
        absent = [k for k in KINDS if k not in present]
        for kind in present + ([rng.choice(absent)] if absent else []):  # the same for kinds
            out.append(QA(f"how many {kind} shapes are there ?", NUMBERS[kinds.count(kind)], "count"))
        named = [s for s in self.shapes if sum((t.colour, t.kind) == (s.colour, s.kind) for t in self.shapes) == 1]
        for i, a in enumerate(named):
            for b in named[i + 1:]:  # a is left of b
                about = ((a.colour, a.kind), (b.colour, b.kind))
                out.append(QA(f"is the {a.colour} {a.kind} left or right of the {b.colour} {b.kind} ?", "left",
                              "position", about))
                out.append(QA(f"is the {b.colour} {b.kind} left or right of the {a.colour} {a.kind} ?", "right",
                              "position", about))
        return out


@dataclass(frozen=True)
class SceneSpec:
    """What the generator draws from."""

    image_size: int = 48
    min_shapes: int = 1
    max_shapes: int = 3
    colours: tuple[str, ...] = tuple(COLOURS)
    kinds: tuple[str, ...] = KINDS
    split_weights: tuple[float, float, float] = (0.8, 0.1, 0.1)  # share of the scene space per split
    held_out: tuple[tuple[str, str], ...] = ()  # (colour, kind) pairs only the compositional split shows

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes <= 4:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 4, got {self.min_shapes}, {self.max_shapes}")
        unknown = [c for c in self.colours if c not in COLOURS] + [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown colours/kinds {unknown}; valid: {list(COLOURS)}, {list(KINDS)}")
        if len(self.split_weights) != 3 or min(self.split_weights) <= 0:
            raise ValueError(f"split_weights must be three positive numbers, got {self.split_weights}")
        object.__setattr__(self, "held_out", tuple(tuple(p) for p in self.held_out))  # lists from YAML/JSON
        pairs = {(c, k) for c in self.colours for k in self.kinds}
        bad = [p for p in self.held_out if p not in pairs]
        if bad:
            raise ValueError(f"held_out pairs {bad} are not (colour, kind) pairs of this spec's colours and kinds")
        if pairs <= set(self.held_out):
            raise ValueError("held_out holds out every (colour, kind) pair; the i.i.d. splits would be empty")

    def has_held_out(self, scene: Scene) -> bool:
        """Whether a shape of the scene is of a held-out (colour, kind) pair."""
        return any((s.colour, s.kind) in self.held_out for s in scene.shapes)


def random_scene(rng: random.Random, spec: SceneSpec) -> Scene:
    """One scene: shapes in distinct vertical slots (left to right), each fully inside its slot."""
    size = spec.image_size
    n = rng.randint(spec.min_shapes, spec.max_shapes)
    slots = sorted(rng.sample(range(spec.max_shapes), n))
    width = size / spec.max_shapes
    shapes = []
    for slot in slots:
        size_name = rng.choice(tuple(SIZES))
        radius = max(2, round(SIZES[size_name] * size))
        lo, hi = slot * width + radius + 1, (slot + 1) * width - radius - 1
        x = round(rng.uniform(lo, max(lo, hi)))
        y = rng.randint(radius + 1, size - radius - 2)
        shapes.append(Shape(rng.choice(spec.kinds), rng.choice(spec.colours), size_name, x, y, radius))
    grey = rng.randint(225, 250)
    return Scene(tuple(shapes), size, (grey, grey, grey))


def split_of(scene: Scene, seed: int, weights: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split a scene belongs to: a hash of its full description and the seed, cut by ``weights``."""
    digest = hashlib.sha256(f"{seed}\x00{scene.key()}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    edges = [sum(weights[: i + 1]) / sum(weights) for i in range(len(weights))]
    return SPLITS[next(i for i, e in enumerate(edges) if u < e or i == len(edges) - 1)]


def generate_scenes(split: str, n: int, *, seed: int = 0, spec: SceneSpec = SceneSpec()) -> list[Scene]:
    """``n`` distinct scenes of ``split``, the same for the same (split, n, seed, spec). An i.i.d. split keeps the
    scenes its hash gives it that show no held-out pair (without ``spec.held_out``: exactly the scenes it always
    had); the compositional split keeps the scenes that show one."""
    if split not in (*SPLITS, COMPOSITIONAL):
        raise ValueError(f"unknown split {split!r}; valid: {', '.join((*SPLITS, COMPOSITIONAL))}")
    if split == COMPOSITIONAL and not spec.held_out:
        raise ValueError("the compositional split needs held-out (colour, kind) pairs (SceneSpec.held_out)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"pocketlm-scenes/{seed}/{split}")
    scenes: list[Scene] = []
    seen: set[str] = set()
    tries = 0
    while len(scenes) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct {split} scenes; the scene space is too small for this spec")
        scene = random_scene(rng, spec)
        key = scene.key()
        if key in seen:
            continue
        if split == COMPOSITIONAL:
            if not spec.has_held_out(scene):
                continue
        elif split_of(scene, seed, spec.split_weights) != split or (spec.held_out and spec.has_held_out(scene)):
            continue
        seen.add(key)
        scenes.append(scene)
    return scenes


# ---------------------------------------------------------------------------------------------- image-text items
@dataclass(frozen=True)
class VLItem:
    """One training or evaluation example: an image (index into the dataset's images), a prompt holding
    ``<image>``, the answer (or several reference answers) and its task."""

    image: int
    prompt: str
    answer: str | tuple[str, ...]
    task: str  # "caption" | "vqa"
    qtype: str | None = None  # for vqa: the question type

    @property
    def target(self) -> str:
        """The answer a model is trained on (the first reference)."""
        return self.answer if isinstance(self.answer, str) else self.answer[0]


@dataclass
class VLData:
    """Images (PIL, RGB) and the items over them; ``source`` describes where they came from."""

    images: list[Image.Image]
    items: list[VLItem]
    source: dict = field(default_factory=dict)
    scenes: list[Scene] | None = None  # for generated data: the scene behind each image

    def select(self, task: str) -> list[VLItem]:
        return [it for it in self.items if it.task == task]

    def texts(self) -> list[str]:
        """Every prompt and answer (to build a tokenizer on)."""
        out = []
        for it in self.items:
            out.append(it.prompt)
            out.extend([it.answer] if isinstance(it.answer, str) else it.answer)
        return out


def scenes_data(split: str, n: int, *, seed: int = 0, spec: SceneSpec = SceneSpec()) -> VLData:
    """``n`` scenes of ``split`` rendered, with one caption item and every question item per scene (in the
    compositional split: the questions about a held-out shape, see the module's docstring)."""
    scenes = generate_scenes(split, n, seed=seed, spec=spec)
    held = set(spec.held_out)
    items: list[VLItem] = []
    for i, scene in enumerate(scenes):
        items.append(VLItem(i, CAPTION_PROMPT, scene.caption(), "caption"))
        for qa in scene.questions():
            if split == COMPOSITIONAL and not held & set(qa.about):
                continue
            items.append(VLItem(i, QUESTION_PROMPT.format(question=qa.question), qa.answer, "vqa", qa.qtype))
    return VLData([s.render() for s in scenes], items,
                  {"kind": "shapes", "split": split, "n_images": n, "seed": seed, "spec": _spec_dict(spec)}, scenes)


def _spec_dict(spec: SceneSpec) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(spec).items()}


# ---------------------------------------------------------------------------------------------- users' folders
def _json_rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for i, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path} line {i} is not a JSON object ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {i} is not a JSON object (got {type(row).__name__})")
        rows.append((i, row))
    return rows


def _field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        have = ", ".join(sorted(row)) or "(none)"
        raise DataError(f"{where}: field {name!r} is missing or empty (fields: {have})")
    return value.strip()


def _image_path(images_dir: Path, name: str, where: str) -> Path:
    path = (images_dir / name).resolve()
    if not path.is_file():
        raise DataError(f"{where}: image {name!r} not found in {images_dir}")
    return path


def load_caption_folder(
    images_dir: str | Path,
    captions: str | Path,
    *,
    caption_prompt: str = CAPTION_PROMPT,
    question_prompt: str = QUESTION_PROMPT,
) -> VLData:
    """Images of ``images_dir`` with the captions (and questions) of ``captions``: COCO-style ``.json`` or
    ``.jsonl``. Several captions of one image become one caption item with several references."""
    images_dir, captions = Path(images_dir), Path(captions)
    if not images_dir.is_dir():
        raise DataError(f"image folder not found: {images_dir}")
    if not captions.is_file():
        raise DataError(f"captions file not found: {captions}")
    refs: dict[Path, list[str]] = {}
    questions: list[tuple[Path, str, str, str]] = []
    if captions.suffix == ".json":
        try:
            doc = json.loads(captions.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{captions} is not valid JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
                doc.get("annotations"), list):
            raise DataError(f"{captions}: a COCO captions file holds lists 'images' and 'annotations'")
        files: dict = {}
        for j, im in enumerate(doc["images"]):
            where = f"{captions} images[{j}]"
            if not isinstance(im, dict) or "id" not in im:
                raise DataError(f"{where}: needs 'id' and 'file_name'")
            files[im["id"]] = _image_path(images_dir, _field(im, "file_name", where), where)
        for j, ann in enumerate(doc["annotations"]):
            where = f"{captions} annotations[{j}]"
            if not isinstance(ann, dict) or ann.get("image_id") not in files:
                raise DataError(f"{where}: image_id {ann.get('image_id') if isinstance(ann, dict) else None!r} "
                                f"is not among the ids of 'images'")
            refs.setdefault(files[ann["image_id"]], []).append(_field(ann, "caption", where))
    elif captions.suffix == ".jsonl":
        for line, row in _json_rows(captions):
            where = f"{captions} line {line}"
            path = _image_path(images_dir, _field(row, "image", where), where)
            if "question" in row or "answer" in row:
                questions.append((path, _field(row, "question", where), _field(row, "answer", where),
                                  str(row.get("type") or "question")))
            else:
                refs.setdefault(path, []).append(_field(row, "caption", where))
    else:
        raise DataError(f"{captions}: unsupported captions file {captions.suffix!r}; use COCO-style .json or .jsonl")
    order = list(dict.fromkeys([*refs, *(q[0] for q in questions)]))
    if not order:
        raise DataError(f"{captions} holds no captions or questions")
    index = {p: i for i, p in enumerate(order)}
    items = [VLItem(index[p], caption_prompt, r[0] if len(r) == 1 else tuple(r), "caption") for p, r in refs.items()]
    items += [VLItem(index[p], question_prompt.format(question=q), a, "vqa", t) for p, q, a, t in questions]
    images = [load_image(p) for p in order]
    return VLData(images, items, {"kind": "folder", "images": str(images_dir), "captions": str(captions),
                                  "n_images": len(order)})
