"""The embedded real-image task suite built from Fashion-MNIST (Zalando, MIT license).

Reads the official idx files (gzip) from the Debian package `dataset-fashion-mnist`
(`/usr/share/datasets/fashion-mnist`) or, when absent, from the small sample committed in
`gpg_vlm/assets/fashion_mnist_sample` (same file format, same code path). Four tasks:

- classification: one item upscaled to `image_size` px, "What is this item?", 10 choices;
- grounding: 1-3 items of distinct classes on a canvas, "Where is the sneaker?", the exact box;
- counting: 0-5 items on a canvas, "How many bags are there?", an integer;
- spatial: two items, "Is the bag to the left or to the right of the ankle boot?", left/right.

Boxes are xyxy in canvas pixels, edges on pixel boundaries (x2, y2 exclusive, so a one-pixel
item at column 3 is [3, ., 4, .]); they cover the item's pixels brighter than `INK`. Items
never overlap (their squares are kept `GAP` px apart), so each box belongs to one item.
Everything is drawn from `random.Random` seeded by (seed, task, split): the same arguments
give byte-identical PNGs and JSONL. Train prompts use only train images, test prompts only
t10k images.
"""

from __future__ import annotations

import gzip
import logging
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from gpg_vlm.data.schema import DataError, Row, make_row

log = logging.getLogger("gpg_vlm.data")

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "fashion_mnist_sample"
SAMPLE_PER_CLASS = 50  # the committed sample: first 50 images of each class of each split
SPLITS = {"train": "train", "test": "t10k"}
# Label index -> canonical answer name (official names: T-shirt/top, Trouser, Pullover, Dress,
# Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot), lower case and free of slashes.
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
PLURALS = ("t-shirts", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers", "bags", "ankle boots")
TASKS = {"classification": "classification", "grounding": "grounding", "counting": "reasoning", "spatial": "reasoning"}
SIDE = 28
INK = 40  # a pixel brighter than this belongs to the item's box
GAP = 4  # minimum free pixels between the squares of two items
CANVAS = (112, 224)  # canvas side range, px


@dataclass(frozen=True)
class Split:
    """One split of Fashion-MNIST: `pixels` holds n 28x28 uint8 images back to back."""

    name: str
    pixels: bytes
    labels: bytes
    source: Path

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        return Image.frombytes("L", (SIDE, SIDE), self.pixels[i * SIDE * SIDE:(i + 1) * SIDE * SIDE])

    def by_class(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in CLASS_NAMES]
        for i, label in enumerate(self.labels):
            out[label].append(i)
        return out


def read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    """Read a gzipped idx file (unsigned bytes): (dimensions, data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read gzipped idx file: {exc}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = raw[4 + 4 * ndim:]
    size = 1
    for d in dims:
        size *= d
    if len(data) != size:
        raise DataError(f"{path}: idx header says {dims} ({size} bytes) but holds {len(data)} bytes")
    return dims, data


def write_idx(path: Path, dims: tuple[int, ...], data: bytes) -> None:
    """Write a gzipped idx file of unsigned bytes, reproducibly (no timestamp, no name)."""
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="", compresslevel=9) as g:
        g.write(bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data)


def write_sample(out_dir: str | Path, per_class: int, source: str | Path | None = None) -> None:
    """Write the first `per_class` images of each class of both splits, in file order, as idx files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, prefix in SPLITS.items():
        data = load_split(split, source, require_full=source is None)
        keep = sorted(i for pool in data.by_class() for i in pool[:per_class])
        size = SIDE * SIDE
        write_idx(out_dir / f"{prefix}-images-idx3-ubyte.gz", (len(keep), SIDE, SIDE),
                  b"".join(data.pixels[i * size:(i + 1) * size] for i in keep))
        write_idx(out_dir / f"{prefix}-labels-idx1-ubyte.gz", (len(keep),), bytes(data.labels[i] for i in keep))


def find_source(source: str | Path | None = None, require_full: bool = False) -> Path:
    """The folder with the idx files: `source`, else the Debian package, else the committed sample."""
    if source is not None:
        return Path(source)
    if (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        return DEBIAN_DIR
    if require_full:
        raise DataError(f"Fashion-MNIST not found in {DEBIAN_DIR}; install it: apt-get install dataset-fashion-mnist")
    log.warning("Fashion-MNIST not found in %s; using the small committed sample %s", DEBIAN_DIR, SAMPLE_DIR)
    return SAMPLE_DIR


def load_split(split: str, source: str | Path | None = None, require_full: bool = False) -> Split:
    """Load 'train' (60k in the full set) or 'test' (the official t10k, 10k)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    folder = find_source(source, require_full)
    prefix = SPLITS[split]
    dims, pixels = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    ldims, labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if len(dims) != 3 or dims[1:] != (SIDE, SIDE) or ldims != dims[:1]:
        raise DataError(f"{folder}: {prefix} images {dims} and labels {ldims} do not match")
    if max(labels) >= len(CLASS_NAMES):
        raise DataError(f"{folder}: {prefix} labels go beyond {len(CLASS_NAMES) - 1}")
    return Split(split, pixels, labels, folder)


def _scaled(item: Image.Image, side: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The item resized to side x side and the box of its inked pixels within that square."""
    big = item.resize((side, side), Image.Resampling.BILINEAR)
    box = big.point(lambda v: 255 if v > INK else 0).getbbox()
    return big, box or (0, 0, side, side)


def _place(rng: random.Random, canvas: int, sides: list[int], apart_in_x: bool = False) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of `sides` that keep GAP px apart; None after 200 tries."""
    placed: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(200):
            x, y = rng.randint(0, canvas - side), rng.randint(0, canvas - side)
            if all(
                x + side + GAP <= px or px + ps + GAP <= x or (not apart_in_x and (y + side + GAP <= py or py + ps + GAP <= y))
                for px, py, ps in placed
            ):
                placed.append((x, y, side))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _scene(rng: random.Random, split: Split, pools: list[list[int]], labels: list[int], canvas_range: tuple[int, int],
           max_side: int, apart_in_x: bool = False) -> tuple[Image.Image, list[dict]]:
    """A black canvas with one item per label, scaled and placed at random without overlap."""
    while True:
        canvas = rng.randint(*canvas_range)
        sides = [rng.randint(SIDE, max(SIDE, min(max_side, canvas // 2))) for _ in labels]
        corners = _place(rng, canvas, sides, apart_in_x)
        if corners is not None:
            break
    img = Image.new("L", (canvas, canvas), 0)
    items = []
    for label, side, (x, y) in zip(labels, sides, corners):
        index = rng.choice(pools[label])
        big, (bx1, by1, bx2, by2) = _scaled(split.image(index), side)
        img.paste(big, (x, y))
        items.append({"class": CLASS_NAMES[label], "index": index, "box": [x + bx1, y + by1, x + bx2, y + by2]})
    return img, items


def _classification(rng, split, pools, image_size, canvas):
    label = rng.randrange(len(CLASS_NAMES))
    index = rng.choice(pools[label])
    img = split.image(index).resize((image_size, image_size), Image.Resampling.BILINEAR)
    problem = "What is this item? Answer with one of: " + ", ".join(CLASS_NAMES) + "."
    return img, dict(problem=problem, solution=CLASS_NAMES[label], choices=list(CLASS_NAMES),
                     items=[{"class": CLASS_NAMES[label], "index": index}])


def _grounding(rng, split, pools, image_size, canvas):
    labels = rng.sample(range(len(CLASS_NAMES)), rng.randint(1, 3))
    img, items = _scene(rng, split, pools, labels, canvas, max_side=72)
    target = rng.randrange(len(items))
    return img, dict(problem=f"Where is the {items[target]['class']}? Give its bounding box.",
                     solution=items[target]["box"], items=items)


def _counting(rng, split, pools, image_size, canvas):
    target = rng.randrange(len(CLASS_NAMES))
    count = rng.randint(0, 5)
    others = [c for c in range(len(CLASS_NAMES)) if c != target]
    labels = [target] * count + [rng.choice(others) for _ in range(rng.randint(0 if count else 1, 5 - count))]
    rng.shuffle(labels)
    img, items = _scene(rng, split, pools, labels, canvas, max_side=40)
    return img, dict(problem=f"How many {PLURALS[target]} are there?", solution=count, items=items)


def _spatial(rng, split, pools, image_size, canvas):
    labels = rng.sample(range(len(CLASS_NAMES)), 2)
    img, items = _scene(rng, split, pools, labels, canvas, max_side=64, apart_in_x=True)
    a, b = items
    side = "left" if a["box"][0] < b["box"][0] else "right"
    return img, dict(problem=f"Is the {a['class']} to the left or to the right of the {b['class']}?",
                     solution=side, choices=["left", "right"], items=items)


_BUILDERS = {"classification": _classification, "grounding": _grounding, "counting": _counting, "spatial": _spatial}


def build_tasks(
    task: str,
    split: str,
    n: int,
    seed: int,
    out_dir: str | Path,
    image_size: int = 56,
    canvas: tuple[int, int] = CANVAS,
    source: str | Path | Split | None = None,
) -> list[Row]:
    """Generate `n` rows of one task from one split; PNGs go to out_dir/images/{task}_{split}/.

    image_size: side of classification images. canvas: (min, max) side of the other tasks'
    canvases. source: an idx folder, a loaded Split, or None (Debian package, else sample).
    """
    if task not in _BUILDERS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(_BUILDERS)}")
    if not (SIDE <= image_size <= 1024 and 2 * SIDE + GAP <= canvas[0] <= canvas[1] <= 2048):
        raise DataError(f"image_size {image_size} or canvas {canvas} out of range")
    data = source if isinstance(source, Split) else load_split(split, source)
    if data.name != split:
        raise DataError(f"build_tasks({task!r}, {split!r}) was given the {data.name!r} split")
    pools = data.by_class()
    if not all(pools):
        raise DataError(f"{data.source}: the {split} split lacks some classes")
    rng = random.Random(f"fashion-mnist:{seed}:{task}:{split}")
    out_dir = Path(out_dir)
    folder = out_dir / "images" / f"{task}_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img, fields = _BUILDERS[task](rng, data, pools, image_size, canvas)
        path = folder / f"{i:06d}.png"
        img.save(path, format="PNG")
        record = dict(image=str(path), task=TASKS[task], **fields)
        rows.append(make_row(record, f"fashion-mnist/{task}_{split}:{i + 1}", extra={"split": split, "suite_task": task}))
    return rows
