"""A/B: Swin Mask2Former vs SeMask (semantically masked Swin) on the embedded synthetic dataset,
semantic segmentation.

    python benchmarks/bench_semask.py                                   # budgets 150 and 600, seeds 0 1 2
    python benchmarks/bench_semask.py --budgets 100 400 --seeds 0 1 2 --json ab.json
    python benchmarks/bench_semask.py --budgets 20 --seeds 0 --quick    # smoke run (tiny val split)
    python benchmarks/bench_semask.py --step-time 30                    # paired step and inference times

``--step-time N``: paired per-iteration training and inference times instead (ab_synthetic.py).

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

if __name__ == "__main__":
    sys.exit(main(SPEC))
