"""Python-side registrations for the compiled ``mask2former::`` operators.

The schemas and device kernels are defined in C++ (``csrc/``); this module adds what
``torch.compile`` / ``torch.export`` / autograd need on top of them:

* fake (meta) kernels, which give output shapes without touching data;
* the autograd formula, which calls ``mask2former::ms_deform_attn_backward``
  (``frozen_bn_act`` is inference-only and has none; ``ms_deform_attn_offsets`` is
  inference-only too, and refuses inputs that need gradients rather than return none).

The C++ library names this module with ``set_python_module``, so torch's error for a missing
fake kernel says to import it (e.g. in a process that loaded only the shared library to run an
exported program). On import it hands ``ensure_registered`` to ``backend.state.on_library_loaded``,
which runs it now (registering at once if the library is already loaded; without the library it
does nothing) and after the backend loads the library.
``mask2former/ops/__init__.py`` imports this module, so the hook is in place before any op runs.
"""
import torch

from .backend import state
from .frozen_bn import check_frozen_bn_act_shapes
from .ms_deform_attn import check_ms_deform_attn_offsets_shapes, check_ms_deform_attn_shapes

__all__ = ["ensure_registered"]

_registered = False


def ensure_registered():
    """Register fake kernels and autograd once the C++ library is loaded (idempotent)."""
    global _registered
    if _registered or not hasattr(torch.ops.mask2former, "ms_deform_attn"):
        return
    _registered = True

    @torch.library.register_fake("mask2former::ms_deform_attn")
    def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        check_ms_deform_attn_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("mask2former::ms_deform_attn_backward")
    def _ms_deform_attn_backward_fake(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.mask2former.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        need = ctx.needs_input_grad
        return (
            grad_value if need[0] else None,
            None,
            None,
            grad_locations if need[3] else None,
            grad_weights if need[4] else None,
        )

    torch.library.register_autograd("mask2former::ms_deform_attn", _backward, setup_context=_setup_context)

    @torch.library.register_fake("mask2former::ms_deform_attn_offsets")
    def _ms_deform_attn_offsets_fake(
        value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
    ):
        check_ms_deform_attn_offsets_shapes(
            value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
        )
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_offsets.shape[1], m * d))

    def _offsets_setup_context(ctx, inputs, output):
        # Only called when an input requires grad under grad mode. Without this, torch would
        # warn and silently give no gradient.
        raise RuntimeError(
            "mask2former::ms_deform_attn_offsets is inference-only (no autograd); use "
            "mask2former.ops.ms_deform_attn_from_offsets, which runs ms_deform_attn when gradients are needed"
        )

    def _offsets_backward(ctx, grad_output):
        raise AssertionError("unreachable: _offsets_setup_context raises")

    torch.library.register_autograd(
        "mask2former::ms_deform_attn_offsets", _offsets_backward, setup_context=_offsets_setup_context
    )

    def _check_frozen_bn_act(x, weight, bias, running_mean, running_var, residual):
        check_frozen_bn_act_shapes(x, weight, bias, running_mean, running_var, residual)
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var), ("residual", residual)):
            if t is not None and t.dtype != torch.float32:
                raise ValueError(f"mask2former::frozen_bn_act: {name} must be float32; got {t.dtype}")

    @torch.library.register_fake("mask2former::frozen_bn_act")
    def _frozen_bn_act_fake(x, weight, bias, running_mean, running_var, eps, residual=None, relu=False):
        _check_frozen_bn_act(x, weight, bias, running_mean, running_var, residual)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("mask2former::frozen_bn_act_")
    def _frozen_bn_act_inplace_fake(x, weight, bias, running_mean, running_var, eps, residual=None, relu=False):
        _check_frozen_bn_act(x, weight, bias, running_mean, running_var, residual)


state.on_library_loaded(ensure_registered)
