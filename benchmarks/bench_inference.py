"""CPU inference benchmark for the Mask2Former R50 COCO panoptic model (random weights).

    python benchmarks/bench_inference.py                       # panoptic only, 2 threads, 1 warmup + 3 iters
    python benchmarks/bench_inference.py --tasks panoptic,instance,semantic --json out.json
    python benchmarks/bench_inference.py --profile             # top-15 ops by self CPU time

Weights and the input image are seeded, so runs are comparable across commits. Results are
recorded in benchmarks/RESULTS.md.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmark the checkout this script lives in (works without installing, and an installed copy
# elsewhere does not shadow it)
if os.path.isdir(os.path.join(REPO_ROOT, "mask2former")):
    sys.path.insert(0, REPO_ROOT)
import mask2former as m2f  # noqa: E402
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
TASKS = ("panoptic", "instance", "semantic")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="model config (default: R50 COCO panoptic)")
    p.add_argument("--tasks", default="panoptic", help="comma list of panoptic,instance,semantic")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1216)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write results as JSON")
    p.add_argument("--profile", action="store_true", help="also profile one call; print top-15 ops by self CPU")
    # HOOK: a later `--compare` flag (Hugging Face transformers' Mask2Former) goes here; it should build
    # its own callable + inputs and reuse measure() / time_model() below.
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = sorted(set(args.tasks) - set(TASKS))
    if bad or not args.tasks:
        p.error(f"--tasks must be a non-empty comma list of {','.join(TASKS)}; got {bad or 'nothing'}")
    return args


def max_rss_mib():
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def build_mask2former(args):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(args.config)
    test = "MODEL.MASK_FORMER.TEST."
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
        test + "PANOPTIC_ON", "panoptic" in args.tasks,
        test + "INSTANCE_ON", "instance" in args.tasks,
        test + "SEMANTIC_ON", "semantic" in args.tasks,
        # required when semantic is off; panoptic/instance imply it anyway
        test + "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE", "semantic" not in args.tasks,
    ])
    torch.manual_seed(args.seed)
    return m2f.build_model(cfg).eval()


def make_inputs(args):
    g = torch.Generator().manual_seed(args.seed)
    img = torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8, generator=g)
    return [{"image": img.float(), "height": args.height, "width": args.width}]


def time_model(fn, inputs, warmup, iters):
    """Call ``fn(inputs)`` ``warmup`` times untimed, then ``iters`` times; return the per-call seconds."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(inputs)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(inputs)
            times.append(time.perf_counter() - t0)
    return times


def profile_model(fn, inputs, top=15):
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def measure(name, fn, inputs, args):
    """time_model() plus peak-RSS growth, process CPU time and system load around it."""
    rss0, cpu0, load0 = max_rss_mib(), time.process_time(), os.getloadavg()[0]
    times = time_model(fn, inputs, args.warmup, args.iters)
    cpu = time.process_time() - cpu0
    rss1, load1 = max_rss_mib(), os.getloadavg()[0]
    print(f"\n{name}")
    for i, t in enumerate(times):
        print(f"  iter {i}: {t:8.2f} s")
    median = statistics.median(times) if times else None
    if times:
        print(f"  median: {median:8.2f} s\n  min:    {min(times):8.2f} s")
    print(f"  process CPU time (warmup + iters): {cpu:.1f} s | 1-min load avg before/after: {load0:.2f}/{load1:.2f}")
    print(f"  peak RSS: {rss1:.0f} MiB (+{rss1 - rss0:.0f} MiB during inference)")
    return {"name": name, "times_s": times, "median_s": median, "min_s": min(times) if times else None,
            "cpu_s": cpu, "loadavg_before_after": [load0, load1],
            "peak_rss_mib": rss1, "peak_rss_delta_mib": rss1 - rss0}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | {platform.processor() or platform.machine()}"
          f" | nproc {os.cpu_count()}")
    print(f"mask2former from {os.path.dirname(os.path.dirname(os.path.abspath(m2f.__file__)))}")
    print(f"config {os.path.relpath(args.config, REPO_ROOT)} | tasks {','.join(args.tasks)} | "
          f"image {args.height}x{args.width} | warmup {args.warmup} | iters {args.iters}")

    model = build_mask2former(args)
    inputs = make_inputs(args)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": args.threads, "nproc": os.cpu_count(), "tasks": args.tasks,
        "mask2former_path": os.path.dirname(os.path.abspath(m2f.__file__)),
        "config": os.path.relpath(args.config, REPO_ROOT), "image_hw": [args.height, args.width],
        "warmup": args.warmup, "iters": args.iters,
        "mask2former": measure("mask2former (this repo)", model, inputs, args),
    }
    if args.profile:
        print("\ntop-15 ops by self CPU time (one call):")
        table = profile_model(model, inputs)
        print(table)
        results["profile_table"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
