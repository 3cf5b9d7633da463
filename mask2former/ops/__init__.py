from .ms_deform_attn import check_ms_deform_attn_inputs, ms_deform_attn, ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "check_ms_deform_attn_inputs"]
