"""SeMask's pieces against computations written out here (issue 16): the semantic layer at
initialisation (LayerNorm of its input) and with trained-like weights, windowing on maps whose
sizes are not multiples of the window (zero padding that takes part in the attention), global
attention, chained blocks; the official global-stage rule and state-dict keys; the backbone
contract (features by name, priors beside them); the prior decoder; the prior loss.

Everything runs on tiny inputs; the layers are compared in float64 where values are recomputed.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from mask2former.modeling.backbone.semask_swin import (D2SeMaskSwinTransformer, SemanticAttention, SemanticLayer,
                                                       official_global_stages)
from mask2former.modeling.backbone.swin import D2SwinTransformer
from mask2former.modeling.criterion import semantic_prior_loss
from mask2former.modeling.heads.branch_mask_former_head import SemanticPriorDecoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, K = 8, 5
SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, drop_path_rate=0.0)


def tiny_backbone(num_classes=K, **kw):
    torch.manual_seed(0)
    return D2SeMaskSwinTransformer(**{**SWIN, "num_classes": num_classes, "sem_window_size": 4, **kw}).eval()


def randomise(layer: SemanticLayer, seed=0):
    """Weights as after training: gamma, mlp_res and the LayerNorm's affine away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return layer


def linear(layer, t):
    return t @ layer.weight.T + layer.bias


def layer_norm(norm, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def naive_block(blk, t):
    """One semantic-attention block on the tokens (n, C) of one window: (q (n, K), out (n, C))."""
    q, k, v = linear(blk.mlp_cls_q, t), linear(blk.mlp_cls_k, t), linear(blk.mlp_v, t)
    logits = q @ k.T  # not scaled
    weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
    weights = weights / weights.sum(-1, keepdim=True)
    return q, t + blk.gamma * linear(blk.mlp_res, weights @ v)


def naive_layer(layer, x, H, W):
    """LayerNorm, zero padding bottom/right to whole windows, every window on its own through all
    blocks (padded tokens included, unmasked), crop. window_size None: one window of H x W."""
    B, _, Cx = x.shape
    ws_h, ws_w = (H, W) if layer.window_size is None else (layer.window_size,) * 2
    Hp, Wp = math.ceil(H / ws_h) * ws_h, math.ceil(W / ws_w) * ws_w
    grid = x.new_zeros(B, Hp, Wp, Cx)
    grid[:, :H, :W] = layer_norm(layer.norm1, x).view(B, H, W, Cx)
    out, prior = torch.empty_like(grid), grid.new_empty(B, Hp, Wp, layer.num_classes)
    for b in range(B):
        for r in range(0, Hp, ws_h):
            for c in range(0, Wp, ws_w):
                t = grid[b, r:r + ws_h, c:c + ws_w].reshape(-1, Cx)
                for blk in layer.class_injection:
                    q, t = naive_block(blk, t)
                out[b, r:r + ws_h, c:c + ws_w] = t.view(ws_h, ws_w, Cx)
                prior[b, r:r + ws_h, c:c + ws_w] = q.view(ws_h, ws_w, -1)
    return prior[:, :H, :W].reshape(B, H * W, -1), out[:, :H, :W].reshape(B, H * W, Cx)


# ----------------------------------------------------------------------------- semantic layer
def test_semantic_attention_at_init_is_identity_and_its_prior_is_mlp_cls_q():
    torch.manual_seed(0)
    blk = SemanticAttention(C, K).train()  # dropout active: the zero residual branch stays zero
    x = torch.randn(3, 16, C)
    q, out = blk(x)
    assert blk.gamma.item() == 0 and not blk.mlp_res.weight.any() and not blk.mlp_res.bias.any()
    assert torch.equal(out, x)
    torch.testing.assert_close(q, linear(blk.mlp_cls_q, x))


@pytest.mark.parametrize("window", [4, None])
def test_semantic_layer_at_init_computes_layer_norm_of_its_input(window):
    torch.manual_seed(0)
    layer = SemanticLayer(C, K, window).train()
    with torch.no_grad():  # a non-trivial affine, so that norm1 is not confused with a plain standardisation
        layer.norm1.weight.uniform_(0.5, 2.0)
        layer.norm1.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 5 * 9, C) * 3 + 1
    prior, out = layer(x, 5, 9)
    normed = layer.norm1(x)
    assert torch.equal(out, normed)  # windowing is a permutation; the zero branch adds exact zeros
    assert not torch.allclose(out, x, atol=1e-2)  # normalised, not passed through
    assert prior.shape == (2, 45, K)
    torch.testing.assert_close(prior, layer.class_injection[0].mlp_cls_q(normed))

    randomise(layer)
    prior, out = layer.eval()(x, 5, 9)
    assert not torch.allclose(out, layer.norm1(x), atol=1e-3)


@pytest.mark.parametrize("H, W, window", [(5, 9, 4), (8, 8, 4), (3, 2, 4), (7, 13, 3), (5, 9, None), (6, 7, 16)])
@pytest.mark.parametrize("blocks", [1, 2])
def test_semantic_layer_equals_the_naive_windowed_attention(H, W, window, blocks):
    layer = randomise(SemanticLayer(C, K, window, num_sem_blocks=blocks)).double().eval()
    x = torch.randn(2, H * W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(H * W))
    with torch.no_grad():
        prior, out = layer(x, H, W)
        ref_prior, ref_out = naive_layer(layer, x, H, W)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prior, ref_prior, rtol=1e-10, atol=1e-10)


def test_global_semantic_layer_attends_over_the_whole_map():
    """window_size None: one attention over all H*W tokens, without padding."""
    layer = randomise(SemanticLayer(C, K, None)).double().eval()
    x = torch.randn(1, 35, C, dtype=torch.float64)
    blk = layer.class_injection[0]
    with torch.no_grad():
        prior, out = layer(x, 5, 7)
        q, ref = naive_block(blk, layer_norm(layer.norm1, x[0]))
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prior[0], q, rtol=1e-10, atol=1e-10)


def test_semantic_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_sem_blocks=0"):
        SemanticLayer(C, K, 4, num_sem_blocks=0)
    with pytest.raises(ValueError, match=r"token count 44 != H\*W = 5\*9"):
        SemanticLayer(C, K, 4)(torch.randn(1, 44, C), 5, 9)


# ----------------------------------------------------------------------------- stages and keys
@pytest.mark.parametrize("num_classes, global_stages", [(150, (3,)), (19, ()), (151, ()), (1, ())])
def test_official_global_stage_rule(num_classes, global_stages):
    assert official_global_stages(num_classes) == global_stages
    net = tiny_backbone(num_classes, sem_window_size=3)
    windows = [stage.semantic_layer.window_size for stage in net.layers]
    assert windows == [None if i in global_stages else 3 for i in range(4)]


def test_explicit_global_stages_and_bad_ones():
    assert [s.semantic_layer.window_size for s in tiny_backbone(global_stages=(0, 2)).layers] == [None, 4, None, 4]
    with pytest.raises(ValueError, match=r"global_stages \[4\]: stages \[4\] do not exist \(0..3\)"):
        tiny_backbone(global_stages=(4,))


def test_semask_stage_keys_and_shapes():
    net = tiny_backbone(7, num_sem_blocks=2)
    swin_keys = set(D2SwinTransformer(**SWIN).state_dict())
    sd = net.state_dict()
    extra = {k: tuple(v.shape) for k, v in sd.items() if k not in swin_keys}
    assert swin_keys <= set(sd)  # every Swin key stays, under the same name and shape
    assert all(sd[k].shape == v.shape for k, v in D2SwinTransformer(**SWIN).state_dict().items())
    expected = {}
    for i, dim in enumerate((16, 32, 64, 128)):
        p = f"layers.{i}.semantic_layer."
        expected.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,)})
        for j in range(2):
            q = f"{p}class_injection.{j}."
            expected.update({q + "mlp_cls_q.weight": (7, dim), q + "mlp_cls_q.bias": (7,),
                             q + "mlp_cls_k.weight": (7, dim), q + "mlp_cls_k.bias": (7,),
                             q + "mlp_v.weight": (dim, dim), q + "mlp_v.bias": (dim,),
                             q + "mlp_res.weight": (dim, dim), q + "mlp_res.bias": (dim,), q + "gamma": (1,)})
    assert extra == expected


def test_semantic_layer_output_is_the_stage_output_and_the_next_stage_input():
    net = tiny_backbone()
    layer = net.layers[1]
    randomise(layer.semantic_layer)
    x = torch.randn(2, 5 * 7, 32)
    with torch.no_grad():
        out, down, Hd, Wd, prior = layer(x, 5, 7)
        ref_prior, ref = layer.semantic_layer(layer.forward_blocks(x, 5, 7), 5, 7)
    assert torch.equal(out, ref) and (Hd, Wd) == (3, 4)
    assert torch.equal(down, layer.downsample(ref, 5, 7))
    assert torch.equal(prior, ref_prior.view(2, 5, 7, K).permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------- backbone contract
@pytest.mark.parametrize("out_features", [("res2", "res3", "res4", "res5"), ("res3", "res5")])
def test_backbone_returns_swin_features_and_priors_by_name(out_features):
    net = tiny_backbone(out_features=out_features)
    for stage in net.layers:
        randomise(stage.semantic_layer)
    swin = D2SwinTransformer(**SWIN, out_features=out_features)
    assert net.output_shape() == swin.output_shape()
    assert net.size_divisibility == swin.size_divisibility
    image = torch.randn(2, 3, 72, 100)  # not a multiple of 32: stage maps 18x25, 9x13, 5x7, 3x4
    with torch.no_grad():
        features = net(image)
        again, priors = net.forward_with_priors(image)
    assert list(features) == list(again) == list(priors) == list(out_features)
    for name in out_features:
        spec = net.output_shape()[name]
        h, w = math.ceil(72 / spec.stride), math.ceil(100 / spec.stride)
        assert features[name].shape == (2, spec.channels, h, w)
        assert torch.equal(features[name], again[name])
        assert priors[name].shape == (2, K, h, w)


def test_backbone_features_are_normed_semantic_layer_outputs():
    net = tiny_backbone()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features, priors = net.forward_with_priors(image)
        tokens = net.patch_embed(image).flatten(2).transpose(1, 2)
        out, _, _, _, prior = net.layers[0](tokens, 16, 16)
    torch.testing.assert_close(features["res2"], net.norm0(out).view(1, 16, 16, 16).permute(0, 3, 1, 2))
    torch.testing.assert_close(priors["res2"], prior)


# ----------------------------------------------------------------------------- prior decoder
def bilinear_matrix(n_out, n_in):
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=True."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        pos = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(math.floor(pos)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (pos - lo)
        m[i, hi] += pos - lo
    return m


def resize(x, size):
    return bilinear_matrix(size[0], x.shape[-2]) @ x @ bilinear_matrix(size[1], x.shape[-1]).T


@pytest.mark.parametrize("sizes", [[(8, 12), (4, 6), (2, 3), (1, 2)], [(9, 13), (5, 7), (3, 4), (2, 2)]])
def test_prior_decoder_equals_the_hand_computation(sizes):
    g = torch.Generator().manual_seed(len(sizes[0]))
    names, strides = ["res2", "res3", "res4", "res5"], [4, 8, 16, 32]
    priors = {n: torch.randn(2, K, *s, generator=g, dtype=torch.float64) for n, s in zip(names, sizes)}
    # the names in another order: the decoder orders them by stride
    decoder = SemanticPriorDecoder(names[::-1], strides[::-1])
    out = decoder(priors)
    ref = priors["res2"]
    for n, times in zip(names[1:], (1, 2, 3)):
        y = priors[n]
        for _ in range(times):
            y = resize(y, (2 * y.shape[-2], 2 * y.shape[-1]))
        ref = ref + resize(y, sizes[0])
    ref = resize(ref, (4 * sizes[0][0], 4 * sizes[0][1]))
    assert out.shape == (2, K, 4 * sizes[0][0], 4 * sizes[0][1])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_prior_decoder_rejects_bad_strides_and_missing_priors():
    with pytest.raises(ValueError, match="power-of-two strides"):
        SemanticPriorDecoder(["a", "b"], [4, 12])
    with pytest.raises(ValueError, match="power-of-two strides"):
        SemanticPriorDecoder([], [])
    with pytest.raises(KeyError, match=r"semantic priors \['res3'\] missing"):
        SemanticPriorDecoder(["res2", "res3"], [4, 8])({"res2": torch.zeros(1, K, 2, 2)})


# ----------------------------------------------------------------------------- prior loss
def test_prior_loss_equals_cross_entropy_over_labelled_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    big = torch.randint(0, K, (6, 8), generator=g)
    big[0, :3] = 255
    small = torch.randint(0, K, (4, 5), generator=g)  # a smaller image: padded with the ignore value
    small[3, 4] = 255
    loss = semantic_prior_loss(logits, [big, small], 255)
    logp = torch.log_softmax(logits, 1)
    terms = [-logp[0, big[y, x], y, x] for y in range(6) for x in range(8) if big[y, x] != 255]
    terms += [-logp[1, small[y, x], y, x] for y in range(4) for x in range(5) if small[y, x] != 255]
    assert len(terms) == 48 - 3 + 20 - 1
    torch.testing.assert_close(loss, torch.stack(terms).mean().float(), rtol=1e-6, atol=1e-6)
    padded = torch.full((2, 6, 8), 255)
    padded[0], padded[1, :4, :5] = big, small
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), padded, ignore_index=255))
    loss.backward()
    assert logits.grad[1, :, 4:].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_prior_loss_without_labelled_pixels_is_zero_with_a_graph():
    logits = torch.randn(2, K, 4, 4, requires_grad=True)
    loss = semantic_prior_loss(logits, [torch.full((4, 4), 255), torch.full((2, 3), 255)], 255)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("labels, match", [
    ([torch.full((4, 4), K)], rf"labels must lie in \[0, {K}\) or equal the ignore value 255; got min {K}, max {K}"),
    ([torch.full((4, 4), -1)], r"got min -1, max -1"),
    ([torch.zeros(1, 4, 4, dtype=torch.long)], r"label map 0 has shape \(1, 4, 4\); expected \(h, w\)"),
    ([torch.zeros(4, dtype=torch.long)], r"label map 0 has shape \(4,\); expected \(h, w\)"),
    ([torch.zeros(5, 4, dtype=torch.long)], r"label map 0 has shape \(5, 4\); expected \(h, w\) within .* 4x4"),
    ([torch.zeros(4, 4, dtype=torch.long)] * 2, "1 prior maps but 2 label maps"),
])
def test_prior_loss_rejects_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        semantic_prior_loss(torch.zeros(1, K, 4, 4), labels, 255)
