"""UCF101 as CoOp uses it: the middle frame of each video, one JPEG per video.

CoOp's `UCF-101-midframes/` is published only as a Google Drive zip; the official release is the
videos (UCF101.rar). The split file names every frame (`Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01
.jpg`: the action's CamelCase words joined by '_', the video's stem), so the frames are rebuilt
from the videos: for each entry, the video with the same stem (found by name, case-insensitively,
because a few UCF101 file names differ in case from their folder), decoded with PyAV (the
library torchvision's video reader wrapped) up to frame n // 2 of its n frames, saved as a JPEG.
Frames already written are skipped, so a killed build resumes; each frame is written to a
temporary name and renamed.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..atomic import atomic_write_with
from ..errors import FetchError
from ..runtime.progress import ProgressSink
from .datasets import DatasetSpec

VIDEOS = "UCF-101"
JPEG_QUALITY = 95


def _av():
    try:
        import av
    except ImportError as exc:
        raise FetchError("Building UCF101's middle frames decodes its videos with PyAV, which is"
                         " not installed: pip install av (or safe-cache[fetch]), then run"
                         " again.") from exc
    return av


def middle_frame(video: Path):
    """The frame at index n // 2 (n = the video's frame count) as a PIL image."""
    av = _av()
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        count = stream.frames
        if not count:  # no count in the header: decode once to count
            count = sum(1 for _ in container.decode(stream))
            container.seek(0)
        for index, frame in enumerate(container.decode(stream)):
            if index == count // 2:
                return frame.to_image()
    raise FetchError(f"{video}: could not decode frame {count // 2} of {count}; the video may be"
                     f" damaged: delete the download and run again.")


def _write_frame(job: tuple[str, str]) -> None:
    video, out = Path(job[0]), Path(job[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    frame = middle_frame(video)
    atomic_write_with(out, lambda temporary: frame.save(temporary, "JPEG",
                                                        quality=JPEG_QUALITY))


def _split_entries(spec: DatasetSpec, stage: Path, folder: Path) -> list[str]:
    for place in (stage, folder):
        path = place / (spec.split_file or "")
        if spec.split_file and path.is_file():
            raw = json.loads(path.read_text())
            return [item[0] for part in ("train", "val", "test") for item in raw.get(part, [])]
    raise FetchError(f"{spec.name}: the split file {spec.split_file} is needed to name the frames;"
                     f" list its source before the videos in the spec.")


def build_midframes(spec: DatasetSpec, stage: Path, folder: Path, progress: ProgressSink,
                    workers: int) -> None:
    """Write `<image_dir>/<entry>` for every split entry from the staged videos."""
    videos = next((p / VIDEOS for p in (stage, folder) if (p / VIDEOS).is_dir()), None)
    out_root = stage / spec.image_dir
    entries = _split_entries(spec, stage, folder)
    todo = [e for e in entries if not (out_root / e).is_file()
            and not (folder / spec.image_dir / e).is_file()]
    if todo and videos is None:
        raise FetchError(f"{spec.name}: no {VIDEOS}/ video folder to cut frames from; the videos"
                         f" source must unpack to {VIDEOS}/.")
    if todo:
        index = {p.stem.lower(): p for p in videos.rglob("*") if p.suffix.lower() == ".avi"}
        missing = [e for e in todo if Path(e).stem.lower() not in index]
        if missing:
            raise FetchError(f"{spec.name}: {len(missing)} videos named by the split are not in"
                             f" {videos} (e.g. {Path(missing[0]).stem}.avi); the video archive"
                             f" is incomplete: delete it and run again.")
        jobs = [(str(index[Path(e).stem.lower()]), str(out_root / e)) for e in todo]
        task = progress.start(f"{spec.name}: middle frames", len(jobs), unit="videos")
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_write_frame, jobs, chunksize=16):
                    progress.advance(task, 1)
        else:
            for job in jobs:
                _write_frame(job)
                progress.advance(task, 1)
        progress.finish(task)
    if videos is not None and videos.parent == stage:
        shutil.rmtree(videos)  # the frames are the dataset; the videos stay in the archive
