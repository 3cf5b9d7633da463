"""The fast inference path gives the plain path's outputs on the parity models.

Fast path (the default; mask2former.accel): among others, panoptic / instance post-processing
upsamples only the masks of the queries it uses (``accel.postprocess``), and the MSDeformAttn op
is the compiled kernel when it is available. Plain path: ``model.fast_inference = False`` (the
modules of modeling/ alone: every query's mask upsampled, as the official code does) and
``M2F_OPS=reference`` (the grid_sample op).

With the same op the two post-processings are bitwise equal. Across ops (compiled vs reference)
the float rounding differs, so probabilities agree to the parity tolerance and discrete outputs
(classes, segments) are equal.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_parity import (MODELS, PIXEL_AGREEMENT, PROB_TOL, build_parity_model, canonical_panoptic, parity_cases,
                               parity_file)

REPO_ROOT = Path(__file__).resolve().parents[1]

TASK_SETS = [("panoptic",), ("instance",), ("panoptic", "instance"), ("panoptic", "instance", "semantic")]


def parity_inputs(parity_dir, name):
    io = np.load(parity_file(parity_dir, name, "_io.npz"))
    out = []
    for case in parity_cases(io):
        image, (oh, ow) = io[f"{case}__image"], io[f"{case}__out_hw"]
        out.append({"image": torch.as_tensor(image.transpose(2, 0, 1)).float(), "height": int(oh), "width": int(ow)})
    return out


def set_tasks(model, tasks):
    model.panoptic_on = "panoptic" in tasks
    model.instance_on = "instance" in tasks
    model.semantic_on = "semantic" in tasks
    model.sem_seg_postprocess_before_inference = True


def run(model, inputs, fast):
    model.fast_inference = fast
    with torch.no_grad():
        return [model([inp])[0] for inp in inputs]


def assert_same(a, b, exact):
    if "panoptic_seg" in a:
        (seg_a, info_a), (seg_b, info_b) = a["panoptic_seg"], b["panoptic_seg"]
        if exact:
            assert torch.equal(seg_a, seg_b) and info_a == info_b
        else:
            cats_a, segs_a = canonical_panoptic(seg_a.numpy(), info_a)
            cats_b, segs_b = canonical_panoptic(seg_b.numpy(), info_b)
            assert segs_a == segs_b
            assert (cats_a == cats_b).mean() >= PIXEL_AGREEMENT
    if "instances" in a:
        ia, ib = a["instances"], b["instances"]
        assert ia.pred_classes.tolist() == ib.pred_classes.tolist()
        if exact:
            assert torch.equal(ia.scores, ib.scores) and torch.equal(ia.pred_masks, ib.pred_masks)
            assert torch.equal(ia.pred_boxes.tensor, ib.pred_boxes.tensor)
        else:
            torch.testing.assert_close(ia.scores, ib.scores, atol=PROB_TOL, rtol=0)
            assert (ia.pred_masks == ib.pred_masks).float().mean() >= PIXEL_AGREEMENT
    if "sem_seg" in a:
        if exact:
            assert torch.equal(a["sem_seg"], b["sem_seg"])
        else:
            torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=PROB_TOL, rtol=0)
    assert a.keys() == b.keys()


def network_outputs(model, inputs):
    """The head outputs of one padded batch of ``inputs``, its unpadded sizes and padded size."""
    from mask2former.modeling.meta_arch.mask_former import pad_images

    batch, sizes = pad_images(model.normalize(inputs), model.size_divisibility)
    with torch.no_grad():
        return model.predict_padded(batch), sizes, tuple(batch.shape[-2:])


def postprocess_both(model, inputs, tasks, network=None):
    """Both post-processings of the network's outputs for ``inputs`` (``network``: those outputs,
    computed once by the caller, else computed here)."""
    set_tasks(model, tasks)
    outputs, sizes, padded = network if network is not None else network_outputs(model, inputs)
    with torch.no_grad():
        model.fast_inference = True
        fast = model.postprocess(outputs, inputs, sizes, padded)
        model.fast_inference = False
        plain = model.postprocess(outputs, inputs, sizes, padded)
    return fast, plain


def _postprocess(model, inputs, tasks, network, fast):
    set_tasks(model, tasks)
    outputs, sizes, padded = network
    model.fast_inference = fast
    with torch.no_grad():
        return model.postprocess(outputs, inputs, sizes, padded)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_selected_postprocessing_is_bitwise_plain(parity_dir, name):
    model = build_parity_model(parity_dir, name)
    kept = 0
    for inp in parity_inputs(parity_dir, name):
        network = network_outputs(model, [inp])  # once per input: the output size is post-processing's
        # the parity output size, and one that differs from the input's (a real second resize)
        for out in (inp, dict(inp, height=inp["height"] + 7, width=inp["width"] - 5)):
            # the plain results of every task set: with all three tasks on, panoptic output does not
            # depend on the others and instance output is that of (panoptic, instance); instance
            # alone keeps non-thing classes, so it is computed on its own
            everything = _postprocess(model, [out], TASK_SETS[-1], network, fast=False)
            plain_of = {TASK_SETS[0]: {"panoptic_seg": everything["panoptic_seg"]},
                        TASK_SETS[1]: _postprocess(model, [out], TASK_SETS[1], network, fast=False),
                        TASK_SETS[2]: {k: everything[k] for k in ("panoptic_seg", "instances")},
                        TASK_SETS[3]: everything}
            for tasks in TASK_SETS:
                fast = _postprocess(model, [out], tasks, network, fast=True)
                assert_same(fast, plain_of[tasks], exact=True)
                kept += len(fast.get("panoptic_seg", (None, []))[1]) + len(fast.get("instances", []))
    model.fast_inference = True
    assert kept > 0, "no segment or instance was produced: the comparison would be vacuous"


def test_selected_postprocessing_of_a_batch(parity_dir):
    model = build_parity_model(parity_dir, "panoptic")
    first = parity_inputs(parity_dir, "panoptic")[0]
    image = first["image"]
    # two images of one size in one batch, the second flipped, with different output sizes
    inputs = [first, {"image": image.flip(-1), "height": image.shape[1] * 2, "width": image.shape[2] * 2}]
    for tasks in TASK_SETS[:3]:
        fast, plain = postprocess_both(model, inputs, tasks)
        assert len(fast) == 2
        for a, b in zip(fast, plain):
            assert_same(a, b, exact=True)


@pytest.mark.parametrize("name", MODELS)
def test_fast_path_with_compiled_op_matches_plain_reference_path(parity_dir, name, monkeypatch):
    from mask2former.ops import backend_info

    if not backend_info().cpu:
        pytest.skip("the compiled CPU op is not available here (no compiler): fast and plain use the same op")
    model = build_parity_model(parity_dir, name)
    inputs = parity_inputs(parity_dir, name)
    set_tasks(model, TASK_SETS[-1])
    monkeypatch.setenv("M2F_OPS", "compiled")
    fast = run(model, inputs, True)
    monkeypatch.setenv("M2F_OPS", "reference")
    plain = run(model, inputs, False)
    for a, b in zip(fast, plain):
        assert_same(a, b, exact=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_channels_last_upsample_is_bitwise_interpolate(batch):
    """fpn.upsample_bilinear (encoder tokens viewed as a map) equals F.interpolate exactly, and
    the FPN sum it feeds keeps the lateral's NCHW layout."""
    from mask2former.accel.cpu.pixel_decoder import upsample_bilinear_channels_last as upsample_bilinear

    torch.manual_seed(0)
    shapes = [(20, 30), (10, 15), (5, 8)]
    tokens = torch.randn(batch, sum(h * w for h, w in shapes), 32) * 10
    levels = tokens.split([h * w for h, w in shapes], dim=1)
    for z, (h, w) in zip(levels, shapes):
        top = z.transpose(1, 2).reshape(batch, -1, h, w)  # a channels-last view, as in the decoder
        assert top.stride(1) == 1 and not top.is_contiguous()
        for size in [(2 * h, 2 * w), (2 * h + 3, 2 * w - 1)]:
            with torch.no_grad():
                fast = upsample_bilinear(top, size)
            plain = torch.nn.functional.interpolate(top, size=size, mode="bilinear", align_corners=False)
            assert torch.equal(fast, plain)
            lat = torch.randn(plain.shape)  # NCHW, as a conv output
            assert torch.equal(lat.clone().add_(fast), lat + plain) and lat.clone().add_(fast).is_contiguous()
    # with autograd the pixel decoder's FPN step is the plain one (F.interpolate), and gradients flow
    import mask2former as m2f
    from mask2former.accel import set_fast_inference
    from mask2former.accel.cpu.pixel_decoder import FastMSDeformAttnPixelDecoder

    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(REPO_ROOT / "configs/synthetic/panoptic.yaml"))
    decoder = m2f.build_model(cfg).sem_seg_head.pixel_decoder.eval()
    assert isinstance(decoder, FastMSDeformAttnPixelDecoder)
    leaf = torch.randn(1, 64, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    x = torch.randn(1, 64, 6, 10)
    out = decoder.fpn_merge(0, x, leaf)
    out.sum().backward()
    assert leaf.grad is not None
    set_fast_inference(decoder, False)
    assert torch.equal(out, decoder.fpn_merge(0, x, leaf))


def test_single_image_attention_mask_broadcast_equals_per_head_copies():
    """With one image the decoder passes a (Q, h*w) mask that attention broadcasts over heads;
    it gives exactly the result of the (heads, Q, h*w) copies used for batches."""
    from mask2former.layers.transformer_layers import attention_block

    torch.manual_seed(0)
    heads, q, s, c = 8, 20, 300, 64
    attn = torch.nn.MultiheadAttention(c, heads).eval()
    norm = torch.nn.LayerNorm(c)
    tgt, memory = torch.randn(q, 1, c), torch.randn(s, 1, c)
    mask = torch.rand(q, s) < 0.7
    mask[mask.all(-1)] = False
    with torch.no_grad():
        broadcast = attention_block(attn, norm, torch.nn.Identity(), tgt, memory, attn_mask=mask)
        per_head = attention_block(attn, norm, torch.nn.Identity(), tgt, memory,
                                   attn_mask=mask[None].repeat(heads, 1, 1))
    assert torch.equal(broadcast, per_head)


@pytest.mark.parametrize("name", MODELS)
def test_fast_and_plain_paths_are_bitwise_equal(parity_dir, name):
    """With the same op, the whole fast path equals the plain path bit for bit, on its first
    call (which verifies the decoder's pixel selection) and on later ones (which use it)."""
    from mask2former.accel import plain_type, verified
    from mask2former.modeling.transformer_decoder import mask2former_transformer_decoder as dec

    model = build_parity_model(parity_dir, name)
    inputs = parity_inputs(parity_dir, name)
    set_tasks(model, TASK_SETS[-1])
    plain = run(model, inputs, False)
    first = run(model, inputs, True)  # switching fast inference on starts with no verdicts
    second = run(model, inputs, True)
    for p, a, b in zip(plain, first, second):
        assert_same(a, p, exact=True)
        assert_same(b, p, exact=True)
    if isinstance(model.sem_seg_head.predictor, dec.MultiScaleMaskedTransformerDecoder):
        # the selection was checked and used, at the two coarse levels of every input size (also
        # for MP-Former's decoder, whose inference is Mask2Former's)
        assert plain_type(model.sem_seg_head.predictor) is not type(model.sem_seg_head.predictor)
        verdicts = verified(model.sem_seg_head.predictor).verdicts()
        assert len(verdicts) == 2 * len({tuple(i["image"].shape) for i in inputs})
        assert all(verdicts.values())


def _decoder_and_inputs(parity_dir):
    """The panoptic parity model's transformer decoder and the inputs it gets for one image."""
    model = build_parity_model(parity_dir, "panoptic")
    decoder = model.sem_seg_head.predictor
    seen = {}
    hook = decoder.register_forward_hook(lambda m, args, out: seen.update(args=args))
    run(model, parity_inputs(parity_dir, "panoptic")[:1], False)
    hook.remove()
    return decoder, seen["args"]


def test_decoder_fast_path_outputs(parity_dir, monkeypatch):
    """The fast decoder's final logits and masks are the plain decoder's, bit for bit; its
    auxiliary outputs are left out. A selection that fails its check falls back to all pixels."""
    from mask2former.accel import decoder as dec
    from mask2former.accel import set_fast_inference, verified

    decoder, args = _decoder_and_inputs(parity_dir)
    with torch.no_grad():
        set_fast_inference(decoder, False)
        plain = decoder(*args)
        set_fast_inference(decoder, True)
        outs = [decoder(*args), decoder(*args)]
        assert len(plain["aux_outputs"]) == decoder.num_layers
        for out in outs:
            assert torch.equal(out["pred_logits"], plain["pred_logits"])
            assert torch.equal(out["pred_masks"], plain["pred_masks"])
        # the first call computes every mask to verify the selection, so it still has them
        for a, b in zip(outs[0]["aux_outputs"], plain["aux_outputs"], strict=True):
            assert torch.equal(a["pred_masks"], b["pred_masks"])
        assert outs[1]["aux_outputs"] == []

        # wrong pixels (mirrored): the check on the first call rejects them, and the result stays exact
        verified(decoder).clear()
        selected = dec.attention_mask_pixels
        monkeypatch.setattr(dec, "attention_mask_pixels", lambda f, size: selected(f.flip(-1), size))
        for _ in range(2):
            out = decoder(*args)
            assert torch.equal(out["pred_masks"], plain["pred_masks"])
            assert torch.equal(out["pred_logits"], plain["pred_logits"])
        assert verified(decoder).verdicts() and not any(verified(decoder).verdicts().values())
        assert len(out["aux_outputs"]) == decoder.num_layers
        # training never selects
        decoder.train()
        verified(decoder).clear()
        assert len(decoder(*args)["aux_outputs"]) == decoder.num_layers and not verified(decoder).verdicts()


@pytest.mark.parametrize("hw,size", [((48, 64), (6, 8)), ((48, 64), (12, 16)), ((40, 24), (5, 6)),
                                     ((64, 48), (8, 12))])
def test_attention_mask_pixels_downsample_like_all_pixels(hw, size):
    """Bilinear downsampling of the selected pixels equals that of the whole map, bit for bit,
    for every mixture of factors 4 and 8; other factors select nothing."""
    from mask2former.accel.decoder import attention_mask_pixels

    torch.manual_seed(0)
    features = torch.randn(2, 16, *hw) * 5
    embed = torch.randn(2, 7, 16)
    sub = attention_mask_pixels(features, size)
    assert sub.shape == (2, 16, 2 * size[0], 2 * size[1])
    full = torch.einsum("bqc,bchw->bqhw", embed, features)
    part = torch.einsum("bqc,bchw->bqhw", embed, sub)
    interp = lambda x: torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    assert torch.equal(interp(part), interp(full))
    assert torch.equal(interp(sub), interp(features))


@pytest.mark.parametrize("size", [(24, 32), (20, 30), (7, 8), (16, 16)])
def test_attention_mask_pixels_other_factors(size):
    """Factor 2 (every pixel is read), odd and fractional factors: no selection."""
    from mask2former.accel.decoder import attention_mask_pixels

    assert attention_mask_pixels(torch.zeros(1, 4, 48, 64), size) is None


def test_scratch_buffer_reuse_rules():
    import copy
    import gc
    import pickle
    import threading
    import weakref

    from mask2former.accel.cpu.scratch import scratch_buffer

    owner = torch.nn.Linear(2, 2)
    like = torch.zeros(1)
    a = scratch_buffer(owner, "x", (4, 5), like)
    assert a.shape == (4, 5) and a.is_contiguous() and scratch_buffer(owner, "x", (4, 5), like) is a
    assert scratch_buffer(owner, "y", (4, 5), like) is not a  # by name
    assert scratch_buffer(owner, "x", (4, 6), like).shape == (4, 6)  # a new size replaces it
    assert scratch_buffer(owner, "x", (4, 6), like.double()).dtype == torch.float64
    with torch.inference_mode():
        b = scratch_buffer(owner, "x", (4, 6), like)
        assert b.is_inference()
    c = scratch_buffer(owner, "x", (4, 6), like)
    assert not c.is_inference() and c is not b
    c.add_(1)  # writable outside inference mode
    other = []
    t = threading.Thread(target=lambda: other.append(weakref.ref(scratch_buffer(owner, "x", (4, 6), like))))
    t.start()
    t.join()
    gc.collect()
    assert other[0]() is None  # one per thread, released with it
    assert scratch_buffer(owner, "x", (4, 6), like) is c
    assert not list(owner.buffers()) and set(owner.state_dict()) == {"weight", "bias"}
    copy.deepcopy(owner)  # the buffers live off the module: copying and pickling it still work
    pickle.dumps(owner)


@pytest.mark.parametrize("shape", [(1, 50, 16), (3, 7, 16)])
def test_ffn_block_hidden_buffer_is_bitwise(shape):
    """The deformable encoder layer's FFN writes its hidden activations into the shared scratch
    buffer: same bits; a non-contiguous input takes F.linear's own path, the buffer untouched."""
    from mask2former.accel import scratch_owner, set_fast_inference
    from mask2former.accel.cpu.scratch import scratch_buffer
    from mask2former.modeling.pixel_decoder.msdeformattn import MSDeformAttnEncoderLayer

    torch.manual_seed(0)
    layer = MSDeformAttnEncoderLayer(d_model=16, d_ffn=40, n_levels=1, n_heads=2, n_points=1).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        want = layer.forward_ffn(x)
        set_fast_inference(layer)
        hidden = scratch_buffer(scratch_owner(layer), "msdeformattn_encoder_ffn_hidden", (shape[0] * shape[1], 40), x)
        hidden.fill_(float("nan"))
        got = layer.forward_ffn(x)
        assert torch.equal(got, want)
        assert not hidden.isnan().any()  # it held the hidden activations
        xt = torch.stack([x, x], -1)[..., 0]
        assert not xt.is_contiguous()
        hidden.fill_(float("nan"))
        assert torch.equal(layer.forward_ffn(xt), want)
        assert hidden.isnan().all()


@pytest.mark.slow
def test_full_width_r50_fast_path_is_bitwise_plain():
    """The official R50 COCO panoptic architecture at full widths (random weights and frozen-BN
    statistics), so every fast-path piece runs: channel-blocked backbone (checked on the first
    call, used on the second), fused frozen BN, decoder pixel selection, scratch buffers and the
    selected post-processing. Both fast calls equal the plain path bit for bit."""
    import mask2former as m2f
    from mask2former.accel import verified
    from mask2former.accel.cpu import blocked
    from tests.test_frozen_bn_act import randomise_frozen_bn

    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(REPO_ROOT / "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
                         "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", 0.0])
    torch.manual_seed(0)
    model = randomise_frozen_bn(m2f.build_model(cfg).eval())
    with torch.no_grad():
        for p in model.sem_seg_head.predictor.class_embed.parameters():
            p.mul_(20)  # confident classes, so segments and instances survive the thresholds
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 224, 320), generator=g).float()
    inputs = [{"image": image, "height": 224, "width": 320}]
    for tasks in (("panoptic",), ("instance",), ("panoptic", "instance", "semantic")):
        set_tasks(model, tasks)
        plain = run(model, inputs, False)[0]
        fast = [run(model, inputs, True)[0] for _ in range(2)]
        for out in fast:
            assert_same(out, plain, exact=True)
        if tasks == ("panoptic",):
            assert len(plain["panoptic_seg"][1]) > 0
        if tasks == ("instance",):
            assert len(plain["instances"]) > 0
    if blocked.block_size() is not None and m2f.ops.frozen_bn_act_compiled():
        # one thread: never tried (see FastResNet.blocked_allowed)
        expected = {("blocked", (1, 3, 224, 320)): True} if torch.get_num_threads() > 1 else {}
        assert verified(model.backbone).verdicts() == expected


@pytest.mark.parametrize("shape", [(1, 16, 7, 9), (2, 8, 6, 5)])
def test_add_across_layouts(shape):
    from mask2former.accel.cpu.pixel_decoder import add_across_layouts_

    g = torch.Generator().manual_seed(0)
    out = torch.randn(shape, generator=g)
    other = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    want = out + other
    got = add_across_layouts_(out.clone(), other)
    assert torch.equal(got, want) and got.is_contiguous()
    same = torch.randn(shape, generator=g)
    assert torch.equal(add_across_layouts_(out.clone(), same), out + same)


def test_fast_path_batch_of_two_is_bitwise(parity_dir):
    """Two same-size images in one batch: per-head attention masks, batched selection check."""
    from mask2former.accel import verified

    model = build_parity_model(parity_dir, "panoptic")
    first = parity_inputs(parity_dir, "panoptic")[0]
    inputs = [first, dict(first, image=first["image"].flip(-1))]
    set_tasks(model, TASK_SETS[-1])
    outs = {}
    for fast, key in ((False, "plain"), (True, "first"), (True, "second")):
        model.fast_inference = fast
        with torch.no_grad():
            outs[key] = model(inputs)
    for key in ("first", "second"):
        for a, b in zip(outs[key], outs["plain"], strict=True):
            assert_same(a, b, exact=True)
    verdicts = verified(model.sem_seg_head.predictor).verdicts()
    assert verdicts and all(verdicts.values())
    assert all(k[3][0] == 2 for k in verdicts)  # the embeddings' batch: both images at once
