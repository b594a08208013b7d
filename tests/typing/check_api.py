"""Type-checked use of the public API (mypy --strict runs on this file in `make test`)."""

from __future__ import annotations

import torch

import loratch


def typed_usage(path: str) -> float:
    layer: loratch.LoraLinear = loratch.torch_lora_linear(8, 4, 2, 4.0, dropout=0.1, device="cpu")
    y: torch.Tensor = loratch.torch_lora_forward(layer.eval(), torch.randn(2, 8))
    params: list[torch.Tensor] = loratch.torch_lora_trainable_params(layer)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.zero_grad()
    loratch.torch_lora_save_adapters(layer, path)
    loratch.torch_lora_load_adapters(layer, path)
    loratch.torch_lora_merge_weights(layer)
    loratch.torch_lora_unmerge_weights(layer)
    try:
        loratch.torch_lora_linear(8, 4, 0, 1.0)
    except loratch.ConfigError as e:
        _: str = str(e)
    scale: float = layer.scaling
    bias: torch.Tensor | None = layer.bias
    return scale + float(y.sum()) + (0.0 if bias is None else 1.0)


def typed_generation(name: str) -> int:
    one: list[int] = loratch.torch_hf_generate(name, [1, 2, 3], 4, greedy=True)
    batch: list[list[int]] = loratch.torch_hf_generate(name, [[1, 2], [3]], 4, greedy=True, eos_token_id=2)
    return len(one) + sum(map(len, batch))
