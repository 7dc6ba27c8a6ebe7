"""Videos, side by side in one run: clipengine's sampling (a look a second by seeking to keyframes, one frame
kept per scene change) against decoding every frame, and the settings that decide it, chosen by measurement.

The videos: 1280x720 H.264 at 30 fps, a keyframe a second as phones write them (PyAV's libx264, preset
veryfast), each a run of scenes of 3 to 12 seconds (photo-like pictures panning by 1 pixel a frame; every other
change is to a picture half made of the one before), one with an 8-second black intro. Where each scene starts is known, so a sampling can be scored:
  - moments found: for each scene, its still picture is the query (tiny model, exact search over the frames
    kept from every video); found when the best frame is of the right video and inside that scene;
  - frames kept per minute of video, and seconds of video looked at per second of wall time.
Then, per model (tiny, and ViT-B-32 with random weights, which costs what a trained one does):
`index_folder` end to end on 2 cores (hash, look, embed, commit), seconds of video indexed per second, and
the same videos' every frame decoded (and what embedding each of them would cost, at the measured ms per
frame). Where the time of a look goes comes from `open_video`'s own timings.

    python benchmarks/bench_video.py            # 4 videos of 60 s
    python benchmarks/bench_video.py --quick    # 2 videos of 15 s, tiny model only
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from results_file import save_result  # benchmarks/ is on sys.path when a script runs
from synthetic import write_video

from clipengine.embed import embed_pil_images
from clipengine.formats import DEFAULT_SAMPLING, VideoSampling
from clipengine.index.pipeline import index_folder
from clipengine.models import ModelSpec, load_model
from clipengine.scenes import photo_like
from clipengine.video import DecodedVideo, _signature, choose_frames, open_video

SIZE = (1280, 720)
FPS = 30
THRESHOLDS = (0.02, 0.05, 0.08, 0.12, 0.2)
INTERVALS = (0.5, 1.0, 2.0)
CAPS = (8, 16, 32)


def write_videos(folder: Path, count: int, seconds: int, seed: int = 0) -> tuple[dict, dict]:
    """The benchmark's videos. Returns each one's scenes as (start, end, picture number), and the pictures.
    Every other scene change is to a picture half made of the one before (the camera turning to what is next
    to it), so that not every change is an easy one."""
    rng = np.random.default_rng(seed)
    scenes: dict[str, list[tuple[float, float, int]]] = {}
    pictures: dict[int, Image.Image] = {}
    for v in range(count):
        segments: list = [(8, None)] if v == 0 else []
        number = 1000 * (v + 1)
        while sum(s for s, _ in segments) < seconds:
            number += 1
            fresh = photo_like(*SIZE, seed=number)
            pictures[number] = Image.blend(pictures[number - 1], fresh, 0.5) if number - 1 in pictures and number % 2 else fresh
            segments.append((int(rng.integers(3, 13)), number))
        name = f"VID_{v:04d}.mp4"
        starts = write_video(folder / name, [(s, None if p is None else pictures[p]) for s, p in segments],
                             fps=FPS, size=SIZE, pan=1, options={"preset": "veryfast"})
        scenes[name] = [(start, start + s, p) for start, (s, p) in zip(starts, segments, strict=True) if p is not None]
    return scenes, pictures


def moments_found(kept: dict[str, list[tuple[float, np.ndarray]]], scenes: dict, queries: dict[int, np.ndarray]) -> float:
    """The share of scenes whose still picture finds a frame of its own video inside itself."""
    names = [n for n, frames in kept.items() for _ in frames]
    seconds = np.array([t for frames in kept.values() for t, _ in frames])
    vectors = np.stack([v for frames in kept.values() for _, v in frames])
    found = total = 0
    for name, spans in scenes.items():
        for start, end, picture in spans:
            best = int(np.argmax(vectors @ queries[picture]))
            found += names[best] == name and start <= seconds[best] < end
            total += 1
    return found / total


def every_frame_seconds(path: Path) -> tuple[float, int]:
    """Decoding every frame of a video, each brought to the model's input size: seconds, frames."""
    import av

    started = time.perf_counter()
    frames = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frame.to_image(width=398, height=224, interpolation="AREA")
            frames += 1
    return time.perf_counter() - started, frames


def embed_ms(model, images: list) -> float:
    embed_pil_images(model, images[:2])
    started = time.perf_counter()
    for i in range(0, len(images), 32):
        embed_pil_images(model, images[i:i + 32])
    return (time.perf_counter() - started) * 1000 / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    count, seconds = (2, 15) if args.quick else (4, 60)
    models = ("tiny",) if args.quick else ("tiny", "ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        print(f"writing {count} videos of {seconds} s at {SIZE[0]}x{SIZE[1]}, {FPS} fps ...", flush=True)
        scenes, pictures = write_videos(folder, count, seconds)
        paths = sorted(folder.iterdir())
        duration = 0.0
        tiny = load_model(ModelSpec(arch="tiny"), device="cpu")
        queries = dict(zip(pictures, embed_pil_images(tiny, list(pictures.values())), strict=True))

        # 1. the settings: looks at each interval, every lively look embedded once, each threshold choosing among them
        sweep = []
        for interval in INTERVALS:
            looked: dict[str, list[tuple[float, np.ndarray, np.ndarray]]] = {}
            wall = 0.0
            for path in paths:
                started = time.perf_counter()
                every = open_video(path, VideoSampling(interval=interval, scene_change=0, max_frames=10**6))
                wall += time.perf_counter() - started
                assert isinstance(every, DecodedVideo), every
                vectors = embed_pil_images(tiny, [f.image for f in every.frames])
                looked[path.name] = [(f.seconds, _signature(f.image), v) for f, v in zip(every.frames, vectors, strict=True)]
                duration += every.duration if interval == INTERVALS[0] else 0
            settings = ([(t, DEFAULT_SAMPLING.max_frames) for t in THRESHOLDS] + [(DEFAULT_SAMPLING.scene_change, m) for m in
                        CAPS if m != DEFAULT_SAMPLING.max_frames] if interval == DEFAULT_SAMPLING.interval
                        else [(DEFAULT_SAMPLING.scene_change, DEFAULT_SAMPLING.max_frames)])
            for threshold, cap in settings:
                sampling = VideoSampling(interval=interval, scene_change=threshold, max_frames=cap)
                kept = {name: [(looks[i][0], looks[i][2]) for i in choose_frames([s for _, s, _ in looks], sampling)]
                        for name, looks in looked.items()}
                frames = sum(len(f) for f in kept.values())
                row = {"interval": interval, "scene_change": threshold, "max_frames": cap, "frames_per_minute": round(frames / duration * 60, 1),
                       "moments_found": round(moments_found(kept, scenes, queries), 3),
                       "looked_seconds_per_second": round(duration / wall, 1)}
                sweep.append(row)
                print(f"  interval {interval} s, scene change {threshold}, at most {cap}: {row['frames_per_minute']} frames/min, "
                      f"{row['moments_found']:.3f} of moments found", flush=True)

        # 2. where a look's time goes, at the defaults
        split = dict.fromkeys(("open", "decode", "convert", "choose"), 0.0)
        for path in paths:
            result = open_video(path)
            assert isinstance(result, DecodedVideo)
            for stage, s in result.timings.items():
                split[stage] += s

        # 3. every frame decoded, against our looks; and end to end per model
        decode_all, all_frames = 0.0, 0
        for path in paths:
            s, n = every_frame_seconds(path)
            decode_all += s
            all_frames += n
        runs = {}
        for arch in models:
            model = tiny if arch == "tiny" else load_model(ModelSpec(arch, "none"), device="cpu")
            per_frame = embed_ms(model, [photo_like(398, 224, seed=i) for i in range(64)])
            report = index_folder(folder, Path(tmp) / f"idx-{arch}", model=model, workers=2, export=False)
            runs[arch] = {
                "index_seconds": round(report.seconds, 2), "frames": report.frames,
                "video_seconds_per_second": round(duration / report.seconds, 1),
                "embed_ms_per_frame": round(per_frame, 2),
                "every_frame_seconds": round(decode_all + all_frames * per_frame / 1000, 1),
                "every_frame_video_seconds_per_second": round(duration / (decode_all + all_frames * per_frame / 1000), 2),
            }
            runs[arch]["speedup_vs_every_frame"] = round(runs[arch]["every_frame_seconds"] / report.seconds, 1)
            print(f"  {arch}: indexed {duration:.0f} s of video in {report.seconds:.1f} s "
                  f"({runs[arch]['video_seconds_per_second']} s/s, {report.frames} frames); every frame would take "
                  f"{runs[arch]['every_frame_seconds']} s ({runs[arch]['speedup_vs_every_frame']}x)", flush=True)
    default = next(r for r in sweep if r["interval"] == DEFAULT_SAMPLING.interval and r["max_frames"] ==
                   DEFAULT_SAMPLING.max_frames and r["scene_change"] == DEFAULT_SAMPLING.scene_change)
    record = {
        "benchmark": "video", "date": dt.date.today().isoformat(), "quick": args.quick, "videos": count,
        "video_seconds": round(duration, 1), "size": f"{SIZE[0]}x{SIZE[1]}", "fps": FPS,
        "scenes": sum(len(s) for s in scenes.values()), "defaults": {
            "interval": DEFAULT_SAMPLING.interval, "scene_change": DEFAULT_SAMPLING.scene_change,
            "max_frames": DEFAULT_SAMPLING.max_frames, "max_looks": DEFAULT_SAMPLING.max_looks},
        "default_frames_per_minute": default["frames_per_minute"], "default_moments_found": default["moments_found"],
        "every_frame_per_minute": round(all_frames / duration * 60, 1),
        "decode_every_frame_seconds": round(decode_all, 2),
        "look_split_seconds": {k: round(v, 3) for k, v in split.items()},
        "sweep": sweep, "models": runs,
    }
    save_result("video", record, args.out, args.quick)


if __name__ == "__main__":
    main()
