"""Peak memory of one CPU training step: point-sampled mask losses vs dense full-resolution ones.

    python benchmarks/bench_train_memory.py                  # the official recipe: R50 COCO panoptic,
                                                             # 2 images of 1024x1024, AMP, 10 segments
    python benchmarks/bench_train_memory.py --batch 1 --amp off          # one image, fp32
    python benchmarks/bench_train_memory.py --num-targets 30 --json out.json
    python benchmarks/bench_train_memory.py --size 256 --batch 1 --num-targets 4   # quick smoke run

One training step is the trainer's step (mask2former/engine/train_loop.py ``TrainLoop.run_step``): forward in
training mode under autocast when SOLVER.AMP.ENABLED (bf16 on CPU; the official recipe trains
with AMP), sum of the weighted losses, backward, SOLVER.CLIP_GRADIENTS, and the optimizer of
SOLVER.OPTIMIZER with its parameter groups (AdamW), on ``--batch`` images (default 2: the
official IMS_PER_BATCH 16 over 8 GPUs) of ``--size`` squared, each with ``--num-targets``
synthetic ground-truth segments (random rectangles, random classes). The variants differ only
in how the mask terms are computed:
    point: loss_mask / loss_dice on TRAIN_NUM_POINTS (12544) importance-sampled points per
           matched mask, matching on 12544 uniform points (the Mask2Former recipe);
    dense: the matched predicted masks upsampled bilinearly to the padded image size and the
           same losses averaged over every pixel (MaskFormer-style); point-based matching;
    dense_all: dense losses and matching costs on every pixel of the padded image as well (all
           Q predictions bilinearly upsampled): the "mask" baseline of the paper's ablation,
           which matches and computes the loss on full masks (18 GB there vs 6 GB with points);
    nomask: the mask losses dropped (matching and loss_ce only): the memory of the model itself,
           so that (variant - nomask) is the memory the mask losses add.

Measuring method: torch's CPU allocations go through malloc, so tracemalloc does not see them.
Each variant runs in a fresh subprocess, which builds the model, allocates the optimizer state
(a zero-gradient step at lr 0), resets the kernel's peak-RSS mark (``echo 5 >
/proc/self/clear_refs``, Linux >= 4.0; else falls back to ru_maxrss) and reports
    step peak = VmHWM after the step - VmRSS just before it
(the memory the step itself adds on top of the built model, its weights, the optimizer state
and the input), and the process's peak RSS during the step (VmHWM). The children run with
MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0 so that glibc returns freed tensor
memory to the OS at once and RSS follows the live allocations (otherwise the heap's dynamic mmap
threshold and caching make the peak depend on the allocation history). Weights and inputs are
seeded; the step is the first training step of the process.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
VARIANTS = ("point", "dense", "dense_all", "nomask")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="model config (default: R50 COCO panoptic)")
    p.add_argument("--size", type=int, default=1024, help="square image side (default 1024, the LSJ crop)")
    p.add_argument("--num-targets", type=int, default=10,
                   help="ground-truth segments per image (default 10, about COCO panoptic's mean)")
    p.add_argument("--batch", type=int, default=2,
                   help="images in the step (default 2: IMS_PER_BATCH 16 over 8 GPUs, the official recipe)")
    p.add_argument("--amp", choices=("config", "on", "off"), default="config",
                   help="autocast (bf16 on CPU): as SOLVER.AMP.ENABLED (default; True in the official "
                        "configs), or forced on / off")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="point,dense,dense_all,nomask",
                   help="comma list of point,dense,dense_all,nomask")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or set(args.variants) - set(VARIANTS):
        p.error(f"--variants must be a comma list of {','.join(VARIANTS)}")
    args.variants = list(dict.fromkeys(args.variants))
    if args.batch < 1 or args.num_targets < 1 or args.size < 32:
        p.error("--batch and --num-targets must be >= 1 and --size >= 32")
    return args


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """VmHWM (resettable by reset_peak_rss); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return max_rss_mib()


def run_child(args) -> dict:
    """Build the model, run one training step, print one JSON line with the measurements."""
    if os.path.isdir(os.path.join(REPO_ROOT, "mask2former")):
        sys.path.insert(0, REPO_ROOT)
    import torch

    import mask2former as m2f
    from mask2former.solver import build_gradient_clipper, build_optimizer
    from mask2former.structures import Instances

    torch.set_num_threads(args.threads)
    cfg = m2f.get_cfg()
    cfg.merge_from_file(args.config)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    amp = cfg.SOLVER.AMP.ENABLED if args.amp == "config" else args.amp == "on"
    torch.manual_seed(args.seed)
    model = m2f.build_model(cfg, load_weights=False).train()
    model.criterion.dense = args.child in ("dense", "dense_all")
    if args.child == "dense_all":
        # matching on every pixel centre of the padded image = on the bilinearly upsampled masks
        pad = -(-args.size // max(model.size_divisibility, 1)) * max(model.size_divisibility, 1)
        ys, xs = torch.meshgrid((torch.arange(pad) + 0.5) / pad, (torch.arange(pad) + 0.5) / pad, indexing="ij")
        every_pixel = torch.stack([xs.flatten(), ys.flatten()], -1)
        model.criterion.matcher.sample_points = lambda device: every_pixel.to(device)
    if args.child == "nomask":
        def no_mask_losses(outputs, targets, indices, num_masks):
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        model.criterion.loss_masks = no_mask_losses
    num_classes = model.sem_seg_head.num_classes

    g = torch.Generator().manual_seed(args.seed)
    s = args.size
    batch = []
    for _ in range(args.batch):
        image = torch.randint(0, 256, (3, s, s), dtype=torch.uint8, generator=g)
        masks = torch.zeros(args.num_targets, s, s, dtype=torch.bool)
        for m in masks:
            y0, x0 = (int(v) for v in torch.randint(0, s * 3 // 4, (2,), generator=g))
            h, w = (int(v) for v in torch.randint(s // 16, s // 2, (2,), generator=g))
            m[y0:y0 + h, x0:x0 + w] = True
        classes = torch.randint(0, num_classes, (args.num_targets,), generator=g)
        batch.append({"image": image, "instances": Instances((s, s), gt_classes=classes, gt_masks=masks)})
    optimizer = build_optimizer(cfg, model)
    clipper = build_gradient_clipper(cfg)
    # allocate the optimizer state first (a step with zero gradients and lr 0 changes no weight), so
    # that the measured step is a steady-state one: the state exists before it, as in training
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr

    build_peak = max_rss_mib()
    was_reset = reset_peak_rss()
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if clipper is not None:
        clipper(optimizer)
    optimizer.step()
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib() if was_reset else max_rss_mib()
    return {
        "variant": args.child, "amp": bool(amp), "step_peak_mib": peak - rss_before, "peak_rss_mib": peak,
        "rss_before_step_mib": rss_before, "build_peak_rss_mib": build_peak, "step_s": seconds,
        "total_loss": float(total), "num_losses": len(losses), "peak_source": "VmHWM" if was_reset else "ru_maxrss",
        "note": "" if was_reset or peak > build_peak else
        "peak mark not resettable and the step did not exceed the build-time peak: step_peak is an upper bound",
    }


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)))
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    print(f"config {os.path.relpath(args.config, REPO_ROOT)} | {args.batch} image(s) {args.size}x{args.size} | "
          f"{args.num_targets} targets each | amp {args.amp} | threads {args.threads} | one training step")
    results = {"config": os.path.relpath(args.config, REPO_ROOT), "size": args.size, "batch": args.batch,
               "amp": args.amp, "num_targets": args.num_targets, "threads": args.threads, "variants": {}}
    for v in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--config", args.config, "--size",
               str(args.size), "--num-targets", str(args.num_targets), "--threads", str(args.threads),
               "--seed", str(args.seed), "--batch", str(args.batch), "--amp", args.amp]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"variant {v!r} failed (exit code {proc.returncode})")
        r = json.loads(lines[-1][len("RESULT "):])
        results["variants"][v] = r
        print(f"{v:>5}: step peak {r['step_peak_mib']:8.0f} MiB | process peak RSS {r['peak_rss_mib']:8.0f} MiB | "
              f"RSS before step {r['rss_before_step_mib']:6.0f} MiB | step {r['step_s']:6.1f} s | "
              f"loss {r['total_loss']:.2f}" + (f" | {r['note']}" if r["note"] else ""))
    if {"point", "dense"} <= set(results["variants"]):
        p, d = results["variants"]["point"], results["variants"]["dense"]
        results["step_peak_ratio"] = p["step_peak_mib"] / d["step_peak_mib"]
        results["process_peak_ratio"] = p["peak_rss_mib"] / d["peak_rss_mib"]
        print(f"point / dense: step peak {results['step_peak_ratio']:.3f} | "
              f"process peak {results['process_peak_ratio']:.3f} (target <= 1/3 = 0.333)")
        if "dense_all" in results["variants"]:
            results["step_peak_ratio_vs_dense_all"] = p["step_peak_mib"] / results["variants"]["dense_all"]["step_peak_mib"]
            print(f"point / dense_all: step peak {results['step_peak_ratio_vs_dense_all']:.3f}")
        if "nomask" in results["variants"]:
            base = results["variants"]["nomask"]["step_peak_mib"]
            extra_p, extra_d = p["step_peak_mib"] - base, d["step_peak_mib"] - base
            results["mask_loss_extra_mib"] = {"point": extra_p, "dense": extra_d}
            results["mask_loss_extra_ratio"] = extra_p / extra_d if extra_d > 0 else None
            print(f"memory added by the mask losses (step peak - nomask step peak): point {extra_p:.0f} MiB, "
                  f"dense {extra_d:.0f} MiB" + (f", ratio {extra_p / extra_d:.3f}" if extra_d > 0 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
