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
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one torch thread each when > 1 (default 1)")
    p.add_argument("--datasets-root", default=None,
                   help="$DETECTRON2_DATASETS holding synthetic/ (default: a folder in the temp dir, generated once)")
    p.add_argument("--quick", action="store_true", help="a 64-image train / 8-image val copy of the dataset")
    p.add_argument("--work-dir", default=None, help="where the runs write (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write every run's numbers and the summary here")
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


def main(spec: ABSpec, argv=None):
    args = parse_args(spec, argv)
    datasets_root = _dataset_root(args)
    work = args.work_dir or tempfile.mkdtemp(prefix=f"bench_{spec.name}_")
    threads = 1 if args.jobs > 1 else None
    queue = [(s, b, seed) for b in args.budgets for seed in args.seeds for s in spec.systems]
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
