"""Write miniature copies of every dataset layout of PROTOCOL.md: a few tiny JPEGs per class,
split files in the real formats, entries deliberately not grouped by label."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from safe_cache.data.datasets import load_spec

SPLIT_COUNTS = {"train": 5, "val": 3, "test": 2}  # images per class and split
WNIDS = [f"n0{i:07d}" for i in range(6)]
IMAGENET_NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "ray"]


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> None:
    """A small textured image (random rectangles), so crops of it differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.rectangle([x, y, x + rng.randrange(4, 20), y + rng.randrange(4, 20)],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    image.save(path, "PNG" if path.suffix == ".png" else "JPEG")


def classnames_for(name: str, count: int) -> list[str]:
    return [f"{name}_class_{chr(97 + i)}" for i in range(count)]


def write_split_zhou(root: Path, name: str, classes: int = 4, seed: int = 0,
                     counts: dict[str, int] | None = None) -> dict:
    """Images under <folder>/<image_dir>/<class>/ and split_zhou_<Name>.json, shuffled."""
    spec = load_spec(name)
    image_root = root / spec.folder / spec.image_dir
    names = classnames_for(name, classes)
    split: dict[str, list] = {}
    counter = 0
    for part, per_class in (counts or SPLIT_COUNTS).items():
        items = []
        for label, classname in enumerate(names):
            for i in range(per_class):
                relative = f"{classname}/{part}_{i}.jpg"
                _jpeg(image_root / relative, counter)
                counter += 1
                items.append([relative, label, classname])
        random.Random(seed).shuffle(items)  # not grouped by label, as in Flowers and Cars
        split[part] = items
    (root / spec.folder / spec.split_file).write_text(json.dumps(split))
    return split


def write_fgvc(root: Path, classes: int = 3) -> list[str]:
    spec = load_spec("fgvc_aircraft")
    folder = root / spec.folder
    variants = [f"Boeing 7{i}7-200" for i in range(classes)]  # variant names contain spaces
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    counter = 1000000
    for part, per_class in SPLIT_COUNTS.items():
        lines = []
        for variant in variants:
            for _ in range(per_class):
                _jpeg(folder / spec.image_dir / f"{counter}.jpg", counter)
                lines.append(f"{counter} {variant}")
                counter += 1
        random.Random(1).shuffle(lines)
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    return variants


def write_imagenet_classnames(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{w} {n}" for w, n in zip(WNIDS, IMAGENET_NAMES, strict=True)]
    (folder / "classnames.txt").write_text("\n".join(lines) + "\n")


def write_imagenet(root: Path, split_file: bool = True) -> None:
    """images/{train,val}/<wnid>/ and, like Cross-Modal's split_ImageNet.json, a split whose val
    is one of each class's 5 train images (train 4, test = the val folder's 2)."""
    write_imagenet_classnames(root / "imagenet")
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for sub, count in (("train", 5), ("val", 2)):
        for label, wnid in enumerate(WNIDS):
            for i in range(count):
                relative = f"{sub}/{wnid}/{wnid}_{i}.JPEG"
                _jpeg(root / "imagenet" / "images" / relative, label * 10 + i)
                part = "test" if sub == "val" else "val" if i == 2 else "train"
                split[part].append([relative, label, IMAGENET_NAMES[label]])
    if split_file:
        (root / "imagenet" / "split_ImageNet.json").write_text(json.dumps(split))


def write_imagenet_variants(root: Path) -> None:
    """V2 (numbered folders), Sketch (all wnids), A and R (a sorted 3-class subset)."""
    write_imagenet_classnames(root / "imagenet")
    v2 = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for label in range(len(WNIDS)):
        _jpeg(v2 / str(label) / "a.jpeg", label)
    for wnid in WNIDS:
        _jpeg(root / "imagenet-sketch" / "images" / wnid / "s.JPEG", 1)
    subset = [WNIDS[4], WNIDS[1], WNIDS[2]]
    for folder, image_dir in (("imagenet-adversarial", "imagenet-a"),
                              ("imagenet-rendition", "imagenet-r")):
        for wnid in subset:
            for i in range(2):
                _jpeg(root / folder / image_dir / wnid / f"{i}.jpg", i)


def write_every_layout(root: Path) -> None:
    for name in ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "sun397", "dtd", "eurosat", "ucf101"):
        write_split_zhou(root, name)
    write_fgvc(root)
    write_imagenet(root)
    write_imagenet_variants(root)


UCF_ACTIONS = {"ApplyEyeMakeup": "Apply_Eye_Makeup", "YoYo": "Yo_Yo",
               "HandstandPushups": "Handstand_Pushups"}
UCF_FRAMES = 9  # frame i is a flat grey of 20 * i: the middle frame (4) reads 80


def _video(path: Path, frames: int = UCF_FRAMES) -> None:
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            image = np.full((32, 32, 3), 20 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def write_ucf101_videos(root: Path, per_class: dict[str, int] | None = None) -> dict:
    """The official release's layout, UCF-101/<Action>/v_<Action>_gNN_c01.avi, and CoOp's split
    file naming the middle frames (<Camel_Case_Words>/v_..._gNN_c01.jpg). One action has the
    real set's quirk: its files spell it differently from its folder (HandStandPushups)."""
    folder = root / "ucf101"
    split: dict[str, list] = {}
    counter = 0
    for part, count in (per_class or {"train": 2, "val": 1, "test": 1}).items():
        split[part] = []
        for label, (action, words) in enumerate(UCF_ACTIONS.items()):
            spelled = "HandStandPushups" if action == "HandstandPushups" else action
            for _ in range(count):
                counter += 1
                stem = f"v_{spelled}_g{counter:02d}_c01"
                _video(folder / "UCF-101" / action / f"{stem}.avi")
                split[part].append([f"{words}/{stem}.jpg", label, words])
    (folder / "split_zhou_UCF101.json").write_text(json.dumps(split))
    return split
