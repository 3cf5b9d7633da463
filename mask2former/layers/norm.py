"""Normalization layers and the name -> layer factory used by configs (NORM keys)."""
import torch
from torch import nn
from torch.nn import functional as F


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    State-dict keys are those of ``nn.BatchNorm2d`` (weight, bias, running_mean, running_var);
    ``num_batches_tracked`` from a trainable-BN checkpoint is accepted and dropped.
    """

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            # inference: batch_norm's kernel, which also rounds exactly as the official models do
            return F.batch_norm(x, self.running_mean.to(x.dtype), self.running_var.to(x.dtype),
                                self.weight.to(x.dtype), self.bias.to(x.dtype), False, 0.0, self.eps)
        # training: an explicit affine map so gradients flow to x but not into the statistics
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Return ``module`` with every BatchNorm/SyncBatchNorm replaced by a frozen copy."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.data.copy_(module.weight.detach())
                frozen.bias.data.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.data.copy_(module.running_mean)
                frozen.running_var.data.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert_frozen_batchnorm(child)
            if new_child is not child:
                module.add_module(name, new_child)
        return module


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an (N, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def tf_batch_norm(num_features: int) -> nn.SyncBatchNorm:
    """Batch norm with TensorFlow's defaults (eps 1e-3, momentum 0.01), synchronised across
    processes in distributed training, per process otherwise. Any input rank >= 2 (N, C, ...):
    kMaX-DeepLab applies it after 1-D and 2-D convolutions and to (N, 1, Q, H, W) mask logits."""
    return nn.SyncBatchNorm(num_features, eps=1e-3, momentum=0.01)


_NORMS = {
    "BN": nn.BatchNorm2d,
    "SyncBN": nn.SyncBatchNorm,
    "nnSyncBN": nn.SyncBatchNorm,
    "naiveSyncBN": nn.SyncBatchNorm,
    "FrozenBN": FrozenBatchNorm2d,
    "GN": lambda channels: nn.GroupNorm(32, channels),
    "LN": LayerNorm2d,
}


def get_norm(norm, out_channels: int):
    """Build a normalization layer from a config name ("" / None -> no layer) or a callable."""
    if norm is None or norm == "":
        return None
    if isinstance(norm, str):
        if norm not in _NORMS:
            raise ValueError(
                f"Unknown NORM {norm!r}; expected one of {sorted(_NORMS)} or an empty string"
            )
        norm = _NORMS[norm]
    return norm(out_channels)
