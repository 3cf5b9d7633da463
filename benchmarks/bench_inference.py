"""CPU inference benchmark for the Mask2Former R50 COCO panoptic model (random weights).

    python benchmarks/bench_inference.py                       # panoptic only, 2 threads, 1 warmup + 3 iters
    python benchmarks/bench_inference.py --tasks panoptic,instance,semantic --json out.json
    python benchmarks/bench_inference.py --profile             # top-15 ops by self CPU time
    python benchmarks/bench_inference.py --compare --iters 5   # side by side with transformers
    python benchmarks/bench_inference.py --compile             # eager vs torch.compile (network only)

Weights and the input image are seeded, so runs are comparable across commits. Results are
recorded in benchmarks/RESULTS.md.

``--compare`` builds Hugging Face transformers' Mask2Former with the same widths (ResNet-50
backbone from transformers, 6 MSDeformAttn encoder layers of width 256 / FFN 1024, 9 masked-
attention decoder layers / FFN 2048, 100 queries, 133 classes; random weights) and times its
model call plus its post-processing of the same tasks (``post_process_panoptic_segmentation``
etc., at the same output size) on the same image, normalised beforehand as its image processor
would. transformers is not a dependency of this project: when it cannot be imported, the
benchmark installs it with ``pip install --target`` into ``--peer-site`` (default
``~/.cache/mask2former-bench/site``), which is appended to ``sys.path`` (installed packages
keep precedence). When ``detectron2`` and the official Mask2Former code are importable
(``--official-repo DIR``, a checkout of facebookresearch/Mask2Former; its compiled op is not
needed, its pure-PyTorch fallback runs on CPU), the official model is built from the same config
and timed too. Calls are interleaved (ours, peer, official, ours, ...) so background load hits
all alike; the ratio is the peer's median over ours.
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
m2f = None  # this repo's package, imported by main(); the --child-official process never imports it
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
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(model.predict_padded) against the eager network (no post-processing)")
    p.add_argument("--compare", action="store_true",
                   help="also time transformers' Mask2Former (and the official code when importable)")
    p.add_argument("--peer-site", default=os.path.expanduser("~/.cache/mask2former-bench/site"),
                   help="where --compare installs transformers when it is not importable")
    p.add_argument("--official-repo", metavar="DIR", default=os.environ.get("MASK2FORMER_OFFICIAL_REPO"),
                   help="checkout of the official Mask2Former to time with --compare (needs detectron2); "
                        "default $MASK2FORMER_OFFICIAL_REPO")
    p.add_argument("--official-python", default=sys.executable,
                   help="interpreter with detectron2 for the official code (default: this one)")
    p.add_argument("--child-official", action="store_true", help=argparse.SUPPRESS)
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


def import_transformers(site_dir):
    """Import transformers, installing it into ``site_dir`` (appended to sys.path) if missing."""
    import importlib
    import subprocess

    if os.path.isdir(site_dir) and site_dir not in sys.path:
        sys.path.append(site_dir)
    try:
        return importlib.import_module("transformers")
    except ImportError:
        pass
    print(f"transformers is not importable: installing it into {site_dir} (pip install --target)", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--target", site_dir, "transformers"]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"--compare: could not install transformers ({' '.join(cmd)} failed)")
    if site_dir not in sys.path:
        sys.path.append(site_dir)
    importlib.invalidate_caches()
    return importlib.import_module("transformers")


def build_transformers_peer(cfg, args):
    """transformers' Mask2Former at our config's widths (random weights) and a callable running its
    model and post-processing for ``args.tasks`` on pre-normalised pixel values."""
    tf = import_transformers(args.peer_site)
    tf.logging.set_verbosity_error()  # it warns that only Swin was tested with its Mask2Former
    mf, head = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
    if cfg.MODEL.BACKBONE.NAME != "build_resnet_backbone" or cfg.MODEL.RESNETS.DEPTH != 50:
        raise SystemExit("--compare supports the ResNet-50 configs only")
    backbone = tf.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                               layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])
    config = tf.Mask2FormerConfig(
        backbone_config=backbone, num_labels=head.NUM_CLASSES, num_queries=mf.NUM_OBJECT_QUERIES,
        hidden_dim=mf.HIDDEN_DIM, mask_feature_size=head.MASK_DIM, feature_size=head.CONVS_DIM,
        encoder_layers=head.TRANSFORMER_ENC_LAYERS, decoder_layers=mf.DEC_LAYERS,
        dim_feedforward=mf.DIM_FEEDFORWARD, encoder_feedforward_dim=1024, num_attention_heads=mf.NHEADS)
    torch.manual_seed(args.seed)
    model = tf.Mask2FormerForUniversalSegmentation(config).eval()
    processor = tf.Mask2FormerImageProcessor(ignore_index=255)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    target = [(args.height, args.width)]
    stuff = set(range(head.NUM_CLASSES)) - set(range(80))  # COCO panoptic: 80 things, then stuff
    test = mf.TEST

    def run(pixel_values):
        out = model(pixel_values=pixel_values)
        res = {}
        if "panoptic" in args.tasks:
            res["panoptic"] = processor.post_process_panoptic_segmentation(
                out, threshold=test.OBJECT_MASK_THRESHOLD, overlap_mask_area_threshold=test.OVERLAP_THRESHOLD,
                label_ids_to_fuse=stuff, target_sizes=target)
        if "instance" in args.tasks:
            res["instance"] = processor.post_process_instance_segmentation(out, target_sizes=target)
        if "semantic" in args.tasks:
            res["semantic"] = processor.post_process_semantic_segmentation(out, target_sizes=target)
        return res

    def make_inputs(inputs):
        return ((inputs[0]["image"] - mean) / std).unsqueeze(0)

    return run, make_inputs, f"transformers {tf.__version__}", sum(p.numel() for p in model.parameters())


def run_official_child(args):
    """In a subprocess (the official package is also named ``mask2former``): build the official
    model from the official copy of the config, time it like ours, print one JSON line."""
    import types

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != REPO_ROOT]
    sys.path.insert(0, args.official_repo)
    # an editable install of this project resolves "mask2former" through a meta-path finder
    sys.meta_path[:] = [f for f in sys.meta_path if "editable___mask2former" not in getattr(f, "__module__", "")]
    try:
        import MultiScaleDeformableAttention  # noqa: F401
    except ImportError:
        # the official op is CUDA-only; an empty module makes its CPU fallback run
        sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    torch.set_num_threads(args.threads)
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(os.path.join(args.official_repo, os.path.relpath(args.config, REPO_ROOT)))
    test = "MODEL.MASK_FORMER.TEST."
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
                         test + "PANOPTIC_ON", "panoptic" in args.tasks,
                         test + "INSTANCE_ON", "instance" in args.tasks,
                         test + "SEMANTIC_ON", "semantic" in args.tasks,
                         test + "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE", "semantic" not in args.tasks])
    torch.manual_seed(args.seed)
    model = build_model(cfg).eval()
    times = time_model(model, make_inputs(args), args.warmup, args.iters)
    print("RESULT " + json.dumps({"times_s": times, "peak_rss_mib": max_rss_mib(),
                                  "params": sum(p.numel() for p in model.parameters())}))


def time_official(args):
    import subprocess

    cmd = [args.official_python, os.path.abspath(__file__), "--child-official", "--official-repo",
           args.official_repo, "--config", args.config, "--tasks", ",".join(args.tasks), "--threads",
           str(args.threads), "--warmup", str(args.warmup), "--iters", str(args.iters), "--height",
           str(args.height), "--width", str(args.width), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
        print("\nofficial code: not timed (" + " | ".join(tail) + ")")
        return None
    r = json.loads(lines[-1][len("RESULT "):])
    r["median_s"] = statistics.median(r["times_s"])
    print(f"\nofficial Mask2Former ({args.official_repo}, separate process, {r['params'] / 1e6:.1f} M params)")
    for i, t in enumerate(r["times_s"]):
        print(f"  iter {i}: {t:8.2f} s")
    print(f"  median: {r['median_s']:8.2f} s | peak RSS {r['peak_rss_mib']:.0f} MiB")
    return r


def time_interleaved(contenders, warmup, iters):
    """``contenders``: [(name, fn, inputs)]. Warm each up, then time them in turn ``iters`` rounds."""
    times = {name: [] for name, _, _ in contenders}
    with torch.inference_mode():
        for name, fn, inputs in contenders:
            for _ in range(warmup):
                fn(inputs)
        for _ in range(iters):
            for name, fn, inputs in contenders:
                t0 = time.perf_counter()
                fn(inputs)
                times[name].append(time.perf_counter() - t0)
    return times


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


def compare_compile(model, inputs, args):
    """Eager vs ``torch.compile`` (default inductor backend) of the network on the padded batch,
    interleaved after the compiling first call; also the largest output difference."""
    from mask2former.modeling.meta_arch.mask_former import pad_images

    with torch.inference_mode():
        batch, _ = pad_images(model.normalize(inputs), model.size_divisibility)
        compiled = torch.compile(model.predict_padded)
        t0 = time.perf_counter()
        out_c = compiled(batch)
        compile_s = time.perf_counter() - t0
        out_e = model.predict_padded(batch)
        diff = max((out_c[k] - out_e[k]).abs().max().item() for k in ("pred_logits", "pred_masks"))
    times = time_interleaved([("eager", model.predict_padded, batch), ("compiled", compiled, batch)],
                             args.warmup, args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\ntorch.compile of the network (predict_padded): first call {compile_s:.1f} s, max |compiled - eager| {diff:.2e}")
    for k, v in times.items():
        print(f"  {k:>8}: " + " ".join(f"{t:6.2f}" for t in v) + f" s | median {med[k]:6.2f} s")
    print(f"  eager / compiled: {med['eager'] / med['compiled']:.2f}x")
    return {"first_call_s": compile_s, "max_abs_diff": diff, "times_s": times, "median_s": med}


def compare(model, inputs, args):
    """Ours and transformers' model timed in alternation (after ours was measured alone above, for
    its memory), then the official code in a subprocess when available; ratios = peer / ours."""
    cfg = m2f.get_cfg()
    cfg.merge_from_file(args.config)
    peer_fn, peer_inputs_of, peer_name, peer_params = build_transformers_peer(cfg, args)
    ours_params = sum(p.numel() for p in model.parameters())
    peer_inputs = peer_inputs_of(inputs)
    print(f"\nside by side: ours ({ours_params / 1e6:.1f} M params) vs {peer_name} Mask2Former "
          f"({peer_params / 1e6:.1f} M params), interleaved, warmup {args.warmup}, {args.iters} rounds")
    times = time_interleaved([("ours", model, inputs), ("transformers", peer_fn, peer_inputs)],
                             args.warmup, args.iters)
    out = {"peer": peer_name, "params": {"ours": ours_params, "transformers": peer_params}}
    for name, ts in times.items():
        out[name] = {"times_s": ts, "median_s": statistics.median(ts)}
        print(f"  {name:>12}: " + " ".join(f"{t:6.2f}" for t in ts) + f" s | median {statistics.median(ts):6.2f} s")
    ours = out["ours"]["median_s"]
    out["ratio_vs_transformers"] = out["transformers"]["median_s"] / ours
    print(f"  transformers / ours: {out['ratio_vs_transformers']:.2f}x")
    faster_peer = out["transformers"]["median_s"]
    if args.official_repo:
        official = time_official(args)
        if official is not None:
            out["official"] = official
            out["ratio_vs_official"] = official["median_s"] / ours
            print(f"  official / ours (ours' interleaved median): {out['ratio_vs_official']:.2f}x")
            faster_peer = min(faster_peer, official["median_s"])
    else:
        print("  official code: not timed (give --official-repo and run with a python that has detectron2)")
    out["ratio_vs_faster_peer"] = faster_peer / ours
    print(f"  faster peer / ours: {out['ratio_vs_faster_peer']:.2f}x (target >= 2.0)")
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.child_official:
        return run_official_child(args)
    global m2f
    # benchmark the checkout this script lives in (works without installing, and an installed copy
    # elsewhere does not shadow it)
    if os.path.isdir(os.path.join(REPO_ROOT, "mask2former")):
        sys.path.insert(0, REPO_ROOT)
    import mask2former as m2f
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
    if args.compare:
        results["compare"] = compare(model, inputs, args)
    if args.compile:
        results["compile"] = compare_compile(model, inputs, args)
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
