"""CPU / CUDA benchmark of multi-scale deformable attention (issue 3).

Shape: the pixel decoder of an 800x1216 image (strides 8/16/32 -> levels 100x152, 50x76,
25x38): N=1, Lq = S = 19950, M=8 heads, D=32 channels per head, L=3 levels, P=4 points.
Locations are realistic: each query's reference point (the centre of its own pixel) plus small
per-level offsets of a few pixels; attention weights are a softmax over L*P. Fixed seed.

Compares, as medians over repeats:
  ours       mask2former.ops.ms_deform_attn with the compiled CPU kernel
  reference  mask2former.ops.ms_deform_attn_reference (grid_sample)
  peer       the PyPI package torch-ms-deform-attn (0.1.1). If it is not importable it is
             installed with `pip install --no-build-isolation torch-ms-deform-attn==0.1.1`
             into a cache directory under the temp dir (reused on later runs); if that fails
             the benchmark says so and carries on without it.

    python benchmarks/bench_msdeformattn.py [--threads 2] [--repeats 7] [--no-peer]
    python benchmarks/bench_msdeformattn.py --device cuda [--dtypes float32,float16,bfloat16]
                                            [--batch 1] [--repeats 7] [--iters 20] [--no-peer]

--device cuda times the same shape on the GPU for each dtype (the inputs are made in float32
and cast), with CUDA events around --iters back-to-back calls (median over --repeats rounds),
and reports the error against the reference computed in float32. ours = the compiled CUDA
kernel; the peer runs its CUDA path (it computes float16 / bfloat16 in float32 internally).
Without a GPU, --device cuda exits with a message (exit status 2).
"""
import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask2former.ops import backend_info, ms_deform_attn, ms_deform_attn_reference  # noqa: E402

PEER_VERSION = "0.1.1"
SHAPES = [[100, 152], [50, 76], [25, 38]]


def make_inputs(n=1, m=8, d=32, p=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    nl = len(SHAPES)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    # reference point of every query: the centre of its own pixel, normalised
    refs = []
    for h, w in SHAPES:
        ys, xs = torch.meshgrid(
            (torch.arange(h, dtype=dtype) + 0.5) / h, (torch.arange(w, dtype=dtype) + 0.5) / w, indexing="ij"
        )
        refs.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    ref = torch.cat(refs)  # (S, 2)
    lq = s
    # offsets of a few pixels of each level, normalised by that level's (W, H)
    offsets = torch.randn(n, lq, m, nl, p, 2, generator=g, dtype=dtype) * 2.0
    normalizer = shapes.flip(-1).to(dtype)  # (L, 2) as (W, H)
    loc = ref[None, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
    logits = torch.randn(n, lq, m, nl * p, generator=g, dtype=dtype)
    attw = logits.softmax(-1).view(n, lq, m, nl, p)
    return value, shapes, starts, loc.contiguous(), attw


def make_runners(op, inputs):
    """(forward, forward+backward) closures; fwd+bwd takes grads wrt value, locations, weights."""
    value, shapes, starts, loc, attw = inputs

    def fwd():
        with torch.no_grad():
            op(value, shapes, starts, loc, attw)

    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attw)]
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                           generator=torch.Generator().manual_seed(1)).to(value.device, value.dtype)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        out = op(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(grad_out)

    return fwd, fwd_bwd


def bench(impls, inputs, repeats):
    """Median seconds per implementation as {name: (fwd, fwd_bwd)}. The implementations are
    timed in interleaved rounds, so load from other processes affects them alike."""
    runners = {name: make_runners(op, inputs) for name, op in impls.items()}
    times = {name: ([], []) for name in impls}
    for name, pair in runners.items():  # warm-up
        for fn in pair:
            fn()
    for _ in range(repeats):
        for name, pair in runners.items():
            for i, fn in enumerate(pair):
                t0 = time.perf_counter()
                fn()
                times[name][i].append(time.perf_counter() - t0)
    return {name: tuple(statistics.median(t) for t in ts) for name, ts in times.items()}


def bench_cuda(impls, inputs, repeats, iters):
    """Median seconds per call as {name: (fwd, fwd_bwd)}, timed with CUDA events around `iters`
    back-to-back calls; implementations interleaved per round like `bench`."""
    runners = {name: make_runners(op, inputs) for name, op in impls.items()}
    times = {name: ([], []) for name in impls}
    for pair in runners.values():  # warm-up (first-call work, allocator, autotuning)
        for fn in pair:
            for _ in range(3):
                fn()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, pair in runners.items():
            for i, fn in enumerate(pair):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                times[name][i].append(start.elapsed_time(end) / 1e3 / iters)
    return {name: tuple(statistics.median(t) for t in ts) for name, ts in times.items()}


def _peer_dir(device: str = "cpu") -> Path:
    tag = f"torch-ms-deform-attn-{PEER_VERSION}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    if device == "cuda":  # built where a GPU is visible, so that its CUDA kernels are compiled
        tag += "-cuda"
    return Path(tempfile.gettempdir()) / "m2f-bench" / tag.replace("+", "_")


def load_peer(device: str = "cpu"):
    """Return (ms_deform_attn function, note) or (None, reason it is unavailable)."""
    try:
        mod = importlib.import_module("torch_ms_deform_attn")
        return mod.ms_deform_attn, f"torch-ms-deform-attn {getattr(mod, '__version__', '?')} (installed)"
    except ImportError:
        pass
    target = _peer_dir(device)
    if not (target / "torch_ms_deform_attn").is_dir():
        print(f"installing torch-ms-deform-attn=={PEER_VERSION} into {target} (builds from source, ~1 min) ...",
              flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--quiet",
               "--target", str(target), f"torch-ms-deform-attn=={PEER_VERSION}"]
        env = dict(os.environ)
        if device == "cuda" and "CUDA_HOME" not in env:
            from mask2former.ops.backend.toolchain import cuda_home

            home = cuda_home()  # torch may guess a wrong CUDA_HOME from a wrapper nvcc
            if home:
                env["CUDA_HOME"] = home
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"could not run pip: {exc}"
        if res.returncode != 0:
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-8:])
            return None, f"pip install failed (exit {res.returncode}):\n{tail}"
    sys.path.insert(0, str(target))
    try:
        mod = importlib.import_module("torch_ms_deform_attn")
    except ImportError as exc:  # e.g. built against another torch
        return None, f"installed into {target} but import failed: {exc}"
    return mod.ms_deform_attn, f"torch-ms-deform-attn {getattr(mod, '__version__', '?')} ({target})"


def _cuda_inputs(inputs, dtype):
    return tuple(t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for t in inputs)


def main_cuda(args):
    if not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}, built with CUDA {torch.version.cuda}). Run this on a machine with a GPU.",
              file=sys.stderr)
        return 2
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",") if name.strip()]
    info = backend_info()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, ours: {info.describe('cuda')}", end="")
    print(f" (TORCH_CUDA_ARCH_LIST={info.cuda_arch_list})" if info.cuda else f" ({info.cuda_reason})")
    base = make_inputs(n=args.batch)
    value, shapes, _, loc, _ = base
    print(f"value {tuple(value.shape)}, locations {tuple(loc.shape)}, levels {shapes.tolist()}; "
          f"median of {args.repeats} rounds x {args.iters} calls (CUDA events)")
    peer = None
    if not args.no_peer:
        peer, note = load_peer("cuda")
        if peer is None:
            print("peer unavailable:", note)
        else:
            try:  # its CUDA kernels exist only if it was built where CUDA was usable
                peer(*_cuda_inputs(make_inputs(n=1, m=1, d=4, p=1), torch.float32))
                torch.cuda.synchronize()
                print("peer:", note)
            except Exception as exc:  # noqa: BLE001 - report and go on without it
                print(f"peer unavailable on CUDA: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                peer = None
    ref32 = None
    if not args.no_reference:
        with torch.no_grad():
            ref32 = ms_deform_attn_reference(*_cuda_inputs(base, torch.float32))
    for dtype in dtypes:
        inputs = _cuda_inputs(base, dtype)
        impls = {}
        if info.cuda:
            impls["ours"] = ms_deform_attn
        if not args.no_reference:
            impls["reference"] = ms_deform_attn_reference
        if peer is not None:
            impls["peer"] = peer
        print(f"--- {str(dtype).replace('torch.', '')}")
        if ref32 is not None:
            with torch.no_grad():
                for name, fn in impls.items():
                    err = (fn(*inputs).float() - ref32).abs().max().item()
                    print(f"  max |{name} - reference(float32)| = {err:.2e}")
        results = bench_cuda(impls, inputs, args.repeats, args.iters)
        for name, (f, fb) in results.items():
            print(f"{name:>10}: fwd {f * 1e3:8.3f} ms   fwd+bwd {fb * 1e3:8.3f} ms")
        if "ours" in results:
            for other in ("reference", "peer"):
                if other in results:
                    r = [results[other][i] / results["ours"][i] for i in range(2)]
                    print(f"ours vs {other}: {r[0]:.2f}x faster fwd, {r[1]:.2f}x faster fwd+bwd")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20, help="calls per timed round (--device cuda)")
    parser.add_argument("--batch", type=int, default=1, help="N (--device cuda)")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16", help="comma-separated (--device cuda)")
    parser.add_argument("--no-peer", action="store_true", help="skip torch-ms-deform-attn")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        sys.exit(main_cuda(args))

    info = backend_info()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, ours: {info.describe('cpu')}", end="")
    print(f" ({torch.ops.mask2former._cpu_isa()})" if info.cpu else f" ({info.reason})")
    inputs = make_inputs()
    value, shapes, _, loc, _ = inputs
    print(f"value {tuple(value.shape)}, locations {tuple(loc.shape)}, levels {shapes.tolist()}")

    impls = {}
    if info.cpu:
        impls["ours"] = ms_deform_attn
    else:
        print("ours: compiled CPU kernel unavailable:", info.reason)
    if not args.no_reference:
        impls["reference"] = ms_deform_attn_reference
    if not args.no_peer:
        peer, note = load_peer()
        if peer is None:
            print("peer unavailable:", note)
        else:
            print("peer:", note)
            impls["peer"] = peer

    with torch.no_grad():
        outs = {name: fn(*inputs) for name, fn in impls.items()}
    if "reference" in outs:
        for name, out in outs.items():
            if name != "reference":
                print(f"  max |{name} - reference| = {(out - outs['reference']).abs().max().item():.2e}")

    results = bench(impls, inputs, args.repeats)
    print(f"median of {args.repeats} (interleaved rounds):")
    for name, (f, fb) in results.items():
        print(f"{name:>10}: fwd {f * 1e3:8.1f} ms   fwd+bwd {fb * 1e3:8.1f} ms")
    if "ours" in results:
        for other in ("reference", "peer"):
            if other in results:
                r = [results[other][i] / results["ours"][i] for i in range(2)]
                print(f"ours vs {other}: {r[0]:.2f}x faster fwd, {r[1]:.2f}x faster fwd+bwd")

if __name__ == "__main__":
    main()
