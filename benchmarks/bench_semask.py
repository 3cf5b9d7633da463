"""A/B: Swin Mask2Former vs SeMask (semantically masked Swin) on the embedded synthetic dataset,
semantic segmentation.

    python benchmarks/bench_semask.py                                   # budgets 150 and 600, seeds 0 1 2
    python benchmarks/bench_semask.py --budgets 100 400 --seeds 0 1 2 --json ab.json
    python benchmarks/bench_semask.py --budgets 20 --seeds 0 --quick    # smoke run (tiny val split)
    python benchmarks/bench_semask.py --step-time 30                    # paired step and inference times

``--step-time N``: the cost per iteration, measured so that machine noise falls on both systems
alike: one process builds both models (the configs above, the same seed), draws N training batches
from the shared data pipeline and times a training step (forward, backward, optimizer) of each
model on each batch, alternating which goes first, then the same for inference (eval mode, one
128x128 image). Printed: the median times and their ratio.

Systems: ``configs/synthetic/semantic_swin.yaml`` (a small Swin Mask2Former from scratch) and
``configs/synthetic/semantic_semask.yaml`` (the same model and schedule with SeMask's semantic
layers and prior loss); metrics mIoU and pixel accuracy on the validation split. How runs are made
and what is reported: ab_synthetic.py (mean and sample standard deviation over the seeds, median
step time, peak memory). The same seed gives both systems the same data order but not the same
initial weights (the semantic layers draw their initialisation between Swin's stages).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_synthetic import ABSpec, main  # noqa: E402

SPEC = ABSpec(name="semask",
              systems={"Swin Mask2Former": "configs/synthetic/semantic_swin.yaml",
                       "SeMask": "configs/synthetic/semantic_semask.yaml"},
              metrics=(("sem_seg", "mIoU"), ("sem_seg", "pACC")), budgets=(150, 600), doc=__doc__)



def step_time(n: int, seed: int = 0) -> None:
    import statistics
    import time

    import torch

    import mask2former as m2f
    from ab_synthetic import REPO_ROOT
    from mask2former.data.datasets import synthetic
    from mask2former.engine import Trainer

    synthetic.ensure_synthetic_dataset()
    systems = {}
    for name, path in SPEC.systems.items():
        cfg = m2f.get_cfg()
        cfg.merge_from_file(os.path.join(REPO_ROOT, path))
        cfg.merge_from_list(["SEED", seed, "DATALOADER.NUM_WORKERS", 0])
        torch.manual_seed(seed)
        model = Trainer.build_model(cfg)
        systems[name] = (cfg, model, Trainer.build_optimizer(cfg, model))
    loader = iter(Trainer.build_train_loader(next(iter(systems.values()))[0]))
    batches = [next(loader) for _ in range(n)]
    train = {name: [] for name in systems}
    for i, batch in enumerate(batches):
        for name in (list(systems) if i % 2 == 0 else list(systems)[::-1]):
            _, model, opt = systems[name]
            model.train()
            t0 = time.perf_counter()
            losses = sum(model(batch).values())
            opt.zero_grad(set_to_none=True)
            losses.backward()
            opt.step()
            train[name].append(time.perf_counter() - t0)
    infer = {name: [] for name in systems}
    with torch.no_grad():
        for i, batch in enumerate(batches):
            image = [{"image": batch[0]["image"]}]
            for name in (list(systems) if i % 2 == 0 else list(systems)[::-1]):
                model = systems[name][1].eval()
                t0 = time.perf_counter()
                model(image)
                infer[name].append(time.perf_counter() - t0)
    base, other = list(systems)
    print(f"{n} paired iterations, batch {len(batches[0])}, {torch.get_num_threads()} threads")
    for label, times in (("training step", train), ("inference, one image", infer)):
        med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first call warms up
        print(f"{label}: {base} {med[base]:.3f} s, {other} {med[other]:.3f} s, ratio x{med[other] / med[base]:.3f}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--step-time", type=int, default=0)
    known, rest = p.parse_known_args()
    if known.step_time:
        step_time(known.step_time)
        sys.exit(0)
    sys.exit(main(SPEC, rest))
