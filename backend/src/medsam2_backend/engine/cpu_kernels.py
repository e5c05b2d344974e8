"""fp32 linear layers on oneDNN with prepacked weights, for CPU inference.

PyTorch runs an fp32 `nn.Linear` on the CPU as a plain GEMM that re-reads the weight layout on every call; oneDNN's
inner product with the weight reordered once, at load, does the same fp32 arithmetic faster on this model (the
encoder's linears are about half its time). Same weights, same precision, same operations: only the summation order
inside each dot product differs (logits change by ~1e-6). Used on the CPU in fp32 only: under bf16 autocast and on
GPUs PyTorch's own kernels are the right ones.
"""

from __future__ import annotations

import torch
from torch import nn


def onednn_available() -> bool:
    """oneDNN is built in, and the op this module calls still exists (it is not public PyTorch API)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_linear")


class OneDnnLinear(nn.Module):
    """An `nn.Linear` whose weight is kept in oneDNN's packed layout; its state dict stays the dense one."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._pack(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.has_bias = bias is not None
        self.packed_weight = weight.float().contiguous().to_mkldnn()
        self.packed_bias = (bias if bias is not None else weight.new_zeros(weight.shape[0])).float().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._C._nn.mkldnn_linear(x.float().contiguous().to_mkldnn(), self.packed_weight, self.packed_bias)
        return y.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed_weight.to_dense()
        if self.has_bias:
            destination[prefix + "bias"] = self.packed_bias.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
            return
        bias = state_dict.get(prefix + "bias")
        if self.has_bias and bias is None:
            missing_keys.append(prefix + "bias")
            return
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: {tuple(weight.shape)} in the checkpoint, "
                              f"{(self.out_features, self.in_features)} in the model")
            return
        self._pack(weight, bias if self.has_bias else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


def pack_linear_layers(module: nn.Module) -> int:
    """Replace every `nn.Linear` inside `module` by a `OneDnnLinear`, in place; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, OneDnnLinear(child))
            count += 1
        else:
            count += pack_linear_layers(child)
    return count
