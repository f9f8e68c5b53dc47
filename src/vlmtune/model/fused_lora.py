"""A LoRA Linear layer whose adapter path is one `addmm`: base output + scaling * (x A^T) B^T.

peft's `lora.Linear` computes `result + lora_B(lora_A(x)) * scaling`: the [tokens, out]
product of lora_B, a scaled copy of it, and the sum are three full-size tensors and three
passes over memory per layer, and the backward pass adds one more for the scaling. Here
`torch.addmm` writes the sum directly. The parameters, their names and the saved adapter
are peft's; only the forward pass differs.

The layer is registered through peft's custom-module hook (`LoraConfig._register_custom_module`)
for plain `torch.nn.Linear` layers. Quantised layers (bitsandbytes' Linear4bit subclasses
nn.Linear) and everything else go to peft's own dispatch. Any case the fused path does not
cover, such as DoRA, several active adapters, merged weights, a LoRA bias, LoRA weights in
another dtype than the layer's output outside autocast, or DeepSpeed ZeRO-3 partitioned weights,
runs peft's forward unchanged. NOTE: DeepSpeed and FSDP runs have not been tried here.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class FusedLoraLinear(LoraLinear):
    """peft's LoRA Linear with the adapter's second matmul, scaling and sum fused into one addmm."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fusable_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        result = self.base_layer(x)
        hidden = lora_A(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_A.weight.dtype)))
        fused = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            hidden.reshape(-1, hidden.shape[-1]),
            lora_B.weight.to(hidden.dtype).t(),
            alpha=self.scaling[adapter],
        )
        return fused.view(result.shape)

    def _fusable_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """Return the one active plain-LoRA adapter, or None where peft's forward must run."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant or self.lora_B[active[0]].bias is not None:
            return None
        # DeepSpeed ZeRO-3 gathers a partitioned weight (marked with ds_numel, which peft also checks) only
        # when its own module runs, and the fused path reads lora_B's weight without calling lora_B.
        if hasattr(self.lora_B[active[0]].weight, "ds_numel"):
            return None
        # addmm needs one dtype throughout. Outside autocast, LoRA weights in another dtype than the
        # layer's would mix two, so peft's forward runs and casts the sum back.
        same_dtype = self.lora_A[active[0]].weight.dtype == self.base_layer.weight.dtype
        if not same_dtype and not torch.is_autocast_enabled(self.base_layer.weight.device.type):
            return None
        return active[0]


def fused_linear_or_none(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> nn.Module | None:
    """Return a FusedLoraLinear for a plain nn.Linear, else None so that peft's own dispatch runs (peft's dispatch hook)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if type(base) is not nn.Linear or kwargs.get("parameter_name") is not None:
        return None
    return FusedLoraLinear(target, adapter_name, config=config, **kwargs)


def register_fused_linear(config: LoraConfig) -> LoraConfig:
    """Make `get_peft_model(model, config)` build FusedLoraLinear for plain Linear targets."""
    config._register_custom_module({nn.Linear: fused_linear_or_none})
    return config
