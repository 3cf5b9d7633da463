"""A/B: Mask2Former vs kMaX-DeepLab (argmax clustering), kMaX with CMT-DeepLab's soft clustering
and kMaX with its copy-paste augmentation, on the embedded synthetic panoptic dataset.

    python benchmarks/bench_kmax.py                                   # budgets 300 and 600, seeds 0 1 2
    python benchmarks/bench_kmax.py --budgets 300 --seeds 0 1 2 --jobs 2 --json ab.json
    python benchmarks/bench_kmax.py --budgets 20 --seeds 0 --quick    # smoke run (tiny val split)
    python benchmarks/bench_kmax.py --step-time 20                    # paired step and inference times

Systems: ``configs/synthetic/panoptic.yaml`` (Mask2Former, R18, MSDeformAttn pixel decoder,
masked attention), ``configs/synthetic/panoptic_kmax.yaml`` (kMaX-DeepLab on the same R18 with the
same data, batch, iterations and learning rate: axial-attention pixel decoder, k-means
cross-attention, the official losses and the TF2 warmup-poly schedule),
``configs/synthetic/panoptic_kmax_softmax.yaml`` (the same kMaX model with
MODEL.KMAX_DEEPLAB.TRANS_DEC.ASSIGNMENT "softmax") and
``configs/synthetic/panoptic_kmax_copy_paste.yaml`` (the argmax model trained with kMaX's
copy-paste augmentation, which the other kMaX configs have off to see the samples Mask2Former
sees); metrics PQ, mask AP and mIoU on the validation split. Each system keeps its own input convention (Mask2Former 128x128 LSJ crops; kMaX 129x129, the
32k + 1 size its axial attention needs) and its own post-processing. How runs are made and what
is reported: ab_synthetic.py (mean and sample standard deviation over the seeds, median step
time, peak memory); ``--step-time N``: paired per-iteration times instead (ab_synthetic.py).
The same seed gives the systems the same image order, not the same initial weights.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_synthetic import ABSpec, main  # noqa: E402

SPEC = ABSpec(name="kmax",
              systems={"Mask2Former": "configs/synthetic/panoptic.yaml",
                       "kMaX-DeepLab": "configs/synthetic/panoptic_kmax.yaml",
                       "kMaX softmax": "configs/synthetic/panoptic_kmax_softmax.yaml",
                       "kMaX copy-paste": "configs/synthetic/panoptic_kmax_copy_paste.yaml"},
              metrics=(("panoptic_seg", "PQ"), ("segm", "AP"), ("sem_seg", "mIoU")), budgets=(300, 600), doc=__doc__)

if __name__ == "__main__":
    sys.exit(main(SPEC))
