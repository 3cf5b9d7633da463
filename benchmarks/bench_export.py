"""Exported vs eager inference on the CPU: the full-size Mask2Former R50 COCO panoptic model
(random, seeded weights) at 800x1216, side by side in one run.

    python benchmarks/bench_export.py                          # eager (fast path) vs ONNX Runtime vs OpenVINO
    python benchmarks/bench_export.py --threads 2 --iters 5 --json out.json
    python benchmarks/bench_export.py --export-only --config configs/coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml

Each runtime runs the whole model call (normalise, pad, network, panoptic post-processing), the
exported ones through ``mask2former.export.load_exported``: the same pre- and post-processing
code, only the network differs. Calls are interleaved (eager, onnxruntime, openvino, eager, ...)
so that background load hits all alike; the ratios are medians over the eager model's median.
OpenVINO is timed when it is installed. The export itself (time, file size) is reported too;
``--export-only`` stops there (for configs too large to time). Outputs are compared with the
eager model's (largest probability difference of the semantic map, panoptic pixel agreement).
Results are recorded in benchmarks/RESULTS.md.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="model config (default: R50 COCO panoptic)")
    p.add_argument("--threads", type=int, default=2, help="threads of torch, ONNX Runtime and OpenVINO (default 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1216)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", default="onnx", help="comma list of onnx,torch to export (default onnx)")
    p.add_argument("--export-only", action="store_true", help="only export (time, size), no inference timing")
    p.add_argument("--out-dir", default=None, help="where the exported files go (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON")
    return p.parse_args(argv)


def build(config, seed, threads):
    import mask2former as m2f

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    cfg = m2f.get_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.freeze()
    return cfg, m2f.build_model(cfg).eval()


def main(argv=None):
    args = parse_args(argv)
    from mask2former.export import export_model, load_exported

    cfg, model = build(args.config, args.seed, args.threads)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="m2f-bench-export-")
    report = {"config": os.path.relpath(args.config, REPO_ROOT), "threads": args.threads,
              "size": [args.height, args.width], "torch": torch.__version__, "cpu": platform.processor(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "exports": {}, "runs": {}}
    paths = {}
    for fmt in args.formats.split(","):
        path = os.path.join(out_dir, f"model.{'onnx' if fmt == 'onnx' else 'pt2'}")
        result = export_model(model, path, fmt, height=args.height, width=args.width, cfg=cfg)
        paths[fmt] = path
        report["exports"][fmt] = {"seconds": round(result["seconds"], 1), "MB": round(result["bytes"] / 2**20, 1)}
        print(f"export {fmt}: {result['seconds']:.1f} s, {result['bytes'] / 2**20:.1f} MB")
    if args.export_only:
        return _finish(report, args)

    runners = {"eager": model}
    if "onnx" in paths:
        runners["onnxruntime"] = load_exported(paths["onnx"], cfg, threads=args.threads)
        try:
            runners["openvino"] = load_exported(paths["onnx"], cfg, "openvino", threads=args.threads)
        except ImportError as exc:
            print(f"openvino: not timed ({exc})")
    if "torch" in paths:
        runners["torch.export"] = load_exported(paths["torch"], cfg)
    g = torch.Generator().manual_seed(args.seed)
    image = torch.randint(0, 256, (3, args.height, args.width), generator=g, dtype=torch.uint8).float()
    inputs = [{"image": image, "height": args.height, "width": args.width}]
    times = {k: [] for k in runners}
    outputs = {}
    for it in range(args.warmup + args.iters):
        for name, run in runners.items():
            start = time.perf_counter()
            with torch.no_grad():
                outputs[name] = run(inputs)[0]
            if it >= args.warmup:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["eager"])
    for name, ts in times.items():
        med = statistics.median(ts)
        diff = float((outputs[name]["sem_seg"] - outputs["eager"]["sem_seg"]).abs().max())
        same = float((outputs[name]["panoptic_seg"][0] == outputs["eager"]["panoptic_seg"][0]).float().mean())
        report["runs"][name] = {"median_s": round(med, 3), "ratio_to_eager": round(med / base, 3),
                                "max_prob_diff": diff, "panoptic_pixel_agreement": same}
        print(f"{name:13s} median {med:7.3f} s  x{med / base:5.2f} of eager  max|dp| {diff:.1e}  "
              f"panoptic pixels equal {same:.5f}")
    return _finish(report, args)


def _finish(report, args):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
