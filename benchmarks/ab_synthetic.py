"""The A/B runner that the system benchmarks share (bench_mp_former.py, bench_semask.py): train
each system's synthetic config in its own ``train_net.py`` process at each budget and seed, then
report the evaluation metrics, the median step time and the peak memory per system and budget.

An :class:`ABSpec` names the systems (the first is the baseline) with their configs and the
metrics to read from eval_results.json. Each run sets SOLVER.MAX_ITER = the budget (the poly
schedule follows it) and SEED = the seed (model initialisation and data order), with no
intermediate evaluation and no checkpoint before the last, then evaluates on the validation
split. Runs are interleaved (seed by seed, every system) so that machine noise falls on all alike.
The step time is the median ``time`` of metrics.json (forward, backward and optimizer step of one
iteration, logged every 20); the peak memory is the child's ``ru_maxrss`` (training and evaluation).

``--step-time N`` (:func:`step_time`) measures instead the cost per iteration so that machine noise
falls on every system alike: one process builds every system (its config, the same seed), draws N
training batches from each system's own data pipeline and times a training step (forward,
backward, optimizer) of each system on its i-th batch, rotating which goes first, then the same
for inference (eval mode, one image of the validation split). Printed: the median times and their
ratios to the baseline.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # --step-time imports this checkout's package, installed or not


@dataclass
class ABSpec:
    name: str  # the benchmark's name (temporary folders)
    systems: Dict[str, str]  # system -> config path relative to the repository; the first is the baseline
    metrics: Sequence[Tuple[str, str]]  # (task, metric) of eval_results.json
    budgets: Sequence[int]
    doc: str = ""


def parse_args(spec: ABSpec, argv=None):
    p = argparse.ArgumentParser(description=spec.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=list(spec.budgets),
                   help=f"training iterations (default {' '.join(map(str, spec.budgets))})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--systems", nargs="+", default=None, choices=list(spec.systems),
                   help="run only these systems (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one torch thread each when > 1 (default 1)")
    p.add_argument("--datasets-root", default=None,
                   help="$DETECTRON2_DATASETS holding synthetic/ (default: a folder in the temp dir, generated once)")
    p.add_argument("--quick", action="store_true", help="a 64-image train / 8-image val copy of the dataset")
    p.add_argument("--work-dir", default=None, help="where the runs write (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write every run's numbers and the summary here")
    p.add_argument("--step-time", type=int, default=0, metavar="N",
                   help="instead of training: N paired training steps and inferences per system (see above)")
    return p.parse_args(argv)


def _dataset_root(args) -> str:
    from mask2former.data.datasets import synthetic

    name = "m2f_bench_synthetic_quick" if args.quick else "m2f_bench_synthetic"
    root = args.datasets_root or os.path.join(tempfile.gettempdir(), name)
    splits = {"train": 64, "val": 8} if args.quick else None
    synthetic.ensure_synthetic_dataset(root, **({"splits": splits} if splits else {}))
    return root


def _start(spec, system, budget, seed, out_dir, datasets_root, threads):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--config-file",
           os.path.join(REPO_ROOT, spec.systems[system]), "SOLVER.MAX_ITER", str(budget), "SEED", str(seed),
           "SOLVER.CHECKPOINT_PERIOD", str(budget + 1), "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out_dir]
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(os.path.join(out_dir, "stdout.txt"), "w")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _collect(spec, system, budget, seed, out_dir, proc, log, started):
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        with open(os.path.join(out_dir, "stdout.txt")) as f:
            raise RuntimeError(f"{system} budget {budget} seed {seed} failed:\n{f.read()[-3000:]}")
    with open(os.path.join(out_dir, "eval_results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out_dir, "metrics.json")) as f:
        times = [r["time"] for r in map(json.loads, f) if "time" in r]
    run = {"system": system, "budget": budget, "seed": seed, "wall_s": time.time() - started,
           "step_s": statistics.median(times) if times else float("nan"), "peak_rss_mb": usage.ru_maxrss / 1024}
    run.update({name: results[task][name] for task, name in spec.metrics})
    print(f"  {system:16s} budget {budget:5d} seed {seed}: " + ", ".join(f"{n} {run[n]:.2f}" for _, n in spec.metrics)
          + f", step {run['step_s']:.3f} s, peak {run['peak_rss_mb']:.0f} MB, wall {run['wall_s']:.0f} s", flush=True)
    return run


def _mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(spec, runs):
    rows = []
    for budget in sorted({r["budget"] for r in runs}):
        for system in spec.systems:
            sel = [r for r in runs if r["budget"] == budget and r["system"] == system]
            if not sel:
                continue
            row = {"budget": budget, "system": system, "seeds": len(sel)}
            for key in [n for _, n in spec.metrics] + ["step_s", "peak_rss_mb"]:
                row[key] = _mean_sd([r[key] for r in sel])
            rows.append(row)
    return rows


def print_table(spec, rows):
    names = [n for _, n in spec.metrics]
    print("\n| budget | system | seeds | " + " | ".join(names) + " | step time (s) | peak RSS (MB) |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|")
    for r in rows:
        cells = [f"{r[k][0]:.2f} ± {r[k][1]:.2f}" for k in names]
        cells += [f"{r['step_s'][0]:.3f}", f"{r['peak_rss_mb'][0]:.0f}"]
        print(f"| {r['budget']} | {r['system']} | {r['seeds']} | " + " | ".join(cells) + " |")
    baseline, *others = list(spec.systems)
    for budget in sorted({r["budget"] for r in rows}):
        by_system = {r["system"]: r for r in rows if r["budget"] == budget}
        for other in others:
            if baseline in by_system and other in by_system:
                a, b = by_system[baseline], by_system[other]
                deltas = ", ".join(f"{n} {b[n][0] - a[n][0]:+.2f}" for n in names)
                print(f"budget {budget}: {other} - {baseline}: {deltas}; step time x{b['step_s'][0] / a['step_s'][0]:.2f}, "
                      f"peak RSS x{b['peak_rss_mb'][0] / a['peak_rss_mb'][0]:.2f}")


def step_time(spec: ABSpec, n: int, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Paired per-iteration times (see the module docstring); returns {"train"|"inference": {system: median s}}."""
    import torch

    import mask2former as m2f
    from mask2former.data.datasets import synthetic
    from mask2former.engine import Trainer

    synthetic.ensure_synthetic_dataset()
    systems, batches = {}, {}
    for name, path in spec.systems.items():
        cfg = m2f.get_cfg()
        cfg.merge_from_file(os.path.join(REPO_ROOT, path))
        cfg.merge_from_list(["SEED", seed, "DATALOADER.NUM_WORKERS", 0])
        torch.manual_seed(seed)
        model = Trainer.build_model(cfg)
        systems[name] = (model, Trainer.build_optimizer(cfg, model))
        loader = iter(Trainer.build_train_loader(cfg))
        batches[name] = [next(loader) for _ in range(n)]
        test_loader = iter(Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]))
        batches[name + "/test"] = next(test_loader)
    names = list(systems)

    def rotation(i):
        k = i % len(names)
        return names[k:] + names[:k]

    times = {"train": {s: [] for s in names}, "inference": {s: [] for s in names}}
    for i in range(n):
        for name in rotation(i):
            model, opt = systems[name]
            model.train()
            t0 = time.perf_counter()
            losses = sum(model(batches[name][i]).values())
            opt.zero_grad(set_to_none=True)
            losses.backward()
            opt.step()
            times["train"][name].append(time.perf_counter() - t0)
    with torch.no_grad():
        for i in range(n):
            for name in rotation(i):
                model = systems[name][0].eval()
                t0 = time.perf_counter()
                model(batches[name + "/test"])
                times["inference"][name].append(time.perf_counter() - t0)
    batch = len(batches[names[0]][0])
    print(f"{n} paired iterations, training batch {batch}, {torch.get_num_threads()} threads")
    medians = {}
    for label, per_system in times.items():
        med = medians[label] = {k: statistics.median(v[1:]) for k, v in per_system.items()}  # the first call warms up
        base = names[0]
        print(f"{label}: " + ", ".join(f"{k} {v:.3f} s" + ("" if k == base else f" (x{v / med[base]:.3f})")
                                       for k, v in med.items()))
    return medians


def main(spec: ABSpec, argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--step-time", type=int, default=0)
    known, argv = pre.parse_known_args(argv)
    if known.step_time:
        step_time(spec, known.step_time)
        return 0
    args = parse_args(spec, argv)
    datasets_root = _dataset_root(args)
    work = args.work_dir or tempfile.mkdtemp(prefix=f"bench_{spec.name}_")
    threads = 1 if args.jobs > 1 else None
    systems = args.systems or list(spec.systems)
    queue = [(s, b, seed) for b in args.budgets for seed in args.seeds for s in systems]
    runs, active = [], []
    while queue or active:
        while queue and len(active) < args.jobs:
            system, budget, seed = queue.pop(0)
            out = os.path.join(work, f"{system}_b{budget}_s{seed}")
            os.makedirs(out, exist_ok=True)
            proc, log = _start(spec, system, budget, seed, out, datasets_root, threads)
            active.append((system, budget, seed, out, proc, log, time.time()))
        item = active.pop(0)
        runs.append(_collect(spec, *item))
    rows = summarize(spec, runs)
    print_table(spec, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "summary": rows, "args": vars(args)}, f, indent=1)
    return 0
