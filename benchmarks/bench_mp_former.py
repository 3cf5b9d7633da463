"""A/B: Mask2Former vs MP-Former (mask-piloted training) on the embedded synthetic dataset.

    python benchmarks/bench_mp_former.py                                  # budgets 300 and 1200, seeds 0 1 2
    python benchmarks/bench_mp_former.py --budgets 100 400 --seeds 0 1 2 --jobs 2 --json ab.json
    python benchmarks/bench_mp_former.py --budgets 20 --seeds 0 --quick   # smoke run (tiny val split)

Systems: ``configs/synthetic/panoptic.yaml`` (plain Mask2Former) and
``configs/synthetic/panoptic_mp.yaml`` (the same model and schedule with the released MP-Former
setting); metrics PQ, mask AP and mIoU. How runs are made and what is reported: ab_synthetic.py
(mean and sample standard deviation over the seeds, median step time, peak memory). The same seed gives the two systems the same data order
but not the same initial weights (MP-Former's decoder has no query positions and a class
embedding, so the random draws after it differ).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_synthetic import ABSpec, main  # noqa: E402

SPEC = ABSpec(name="mp_former",
              systems={"Mask2Former": "configs/synthetic/panoptic.yaml", "MP-Former": "configs/synthetic/panoptic_mp.yaml"},
              metrics=(("panoptic_seg", "PQ"), ("segm", "AP"), ("sem_seg", "mIoU")), budgets=(300, 1200), doc=__doc__)

if __name__ == "__main__":
    sys.exit(main(SPEC))
