"""Peak memory of the demo's video path does not grow with the length of the video.

    python benchmarks/bench_demo_video_memory.py                      # 60 and 360 frames, 128x128
    python benchmarks/bench_demo_video_memory.py --frames 60 600 --size 96 --json out.json
    python benchmarks/bench_demo_video_memory.py --config-file CFG --opts MODEL.WEIGHTS model.pth

Writes one synthetic video per ``--frames`` value (``--size`` squared, moving shapes, mp4v) into
a temporary folder and runs ``demo/demo.py --video-input ... --output ...`` on each in a fresh
subprocess. Each child's peak resident set size is its ``ru_maxrss`` as returned by
``os.wait4`` for that child alone (so the model, the libraries and the streaming loop are all
counted). The model is ``configs/synthetic/panoptic.yaml`` with random weights unless
``--config-file`` / ``--opts`` say otherwise: memory does not depend on the weights' values.

Acceptance: peak(longest) < peak(shortest) + ``--max-growth-mb`` (default 100 MB), i.e. frames
are streamed, not accumulated. The exit status is 1 when it fails (or a demo run fails).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "demo", "demo.py")
DEFAULT_CONFIG = os.path.join(REPO, "configs", "synthetic", "panoptic.yaml")


def write_video(path: str, frames: int, size: int, fps: float = 25.0) -> None:
    """A video of ``frames`` frames, ``size`` x ``size``: a circle and a square moving over a
    gradient, so that the predictions change from frame to frame."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {path}: this OpenCV build has no mp4v encoder")
    base = np.zeros((size, size, 3), np.uint8)
    base[..., 0] = np.linspace(120, 240, size, dtype=np.uint8)[:, None]
    base[..., 1] = 160
    for i in range(frames):
        frame = base.copy()
        t = 2 * np.pi * i / 90.0
        cx, cy = int(size / 2 + size / 4 * np.cos(t)), int(size / 2 + size / 4 * np.sin(t))
        cv2.circle(frame, (cx, cy), size // 8, (40, 40, 220), -1)
        x = int((i * 2) % size)
        cv2.rectangle(frame, (x, size - size // 4), (min(size - 1, x + size // 6), size - 4), (30, 200, 240), -1)
        writer.write(frame)
    writer.release()


def run_demo(video: str, out_dir: str, args: argparse.Namespace) -> dict:
    """Run the demo on ``video`` in a child process; its exit status, seconds and peak RSS (MB)."""
    cmd = [sys.executable, DEMO, "--config-file", args.config_file, "--video-input", video,
           "--output", out_dir, "--batch-size", str(args.batch_size),
           "--opts", "MODEL.DEVICE", "cpu", *args.opts]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = os.path.join(out_dir, os.path.basename(video) + ".log")
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux, bytes on macOS
    peak_mb = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return {"returncode": child.returncode, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb, 1),
            "log": log_path}


def count_frames(path: str) -> int:
    cap = cv2.VideoCapture(path)
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[60, 360], help="video lengths to compare")
    parser.add_argument("--size", type=int, default=128, help="frame width and height")
    parser.add_argument("--batch-size", type=int, default=4, help="the demo's --batch-size")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--max-growth-mb", type=float, default=100.0,
                        help="allowed peak-RSS growth from the shortest to the longest video")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for the demo")
    args = parser.parse_args(argv)
    if len(args.frames) < 2 or min(args.frames) < 1:
        parser.error("--frames needs at least two positive lengths")

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_demo_video_") as tmp:
        for frames in sorted(args.frames):
            video = os.path.join(tmp, f"video_{frames}.mp4")
            write_video(video, frames, args.size)
            out_dir = os.path.join(tmp, f"out_{frames}")
            r = run_demo(video, out_dir, args)
            r["frames"] = frames
            written = os.path.join(out_dir, f"video_{frames}.mp4")
            r["frames_written"] = count_frames(written) if os.path.exists(written) else 0
            if r["returncode"] != 0 or r["frames_written"] != frames:
                with open(r["log"]) as f:
                    print(f.read()[-3000:], file=sys.stderr)
            del r["log"]
            results.append(r)
            print(f"{frames:5d} frames ({args.size}x{args.size}): peak RSS {r['peak_rss_mb']:8.1f} MB, "
                  f"{r['seconds']:6.1f} s, {r['frames_written']} frames written, exit status {r['returncode']}",
                  flush=True)

    growth = results[-1]["peak_rss_mb"] - results[0]["peak_rss_mb"]
    ok = all(r["returncode"] == 0 and r["frames_written"] == r["frames"] for r in results)
    passed = ok and growth < args.max_growth_mb
    print(f"peak RSS growth {results[0]['frames']} -> {results[-1]['frames']} frames: {growth:+.1f} MB "
          f"(limit {args.max_growth_mb:.0f} MB): {'PASS' if passed else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "batch_size": args.batch_size, "config_file": args.config_file,
                       "results": results, "growth_mb": round(growth, 1), "pass": passed}, f, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
