"""Basic LoRA API demo (the spec's "Basic LoRA API"): a frozen linear layer learns a hidden
low-rank change through its own LoRA adapters, trained with torch.optim.AdamW on a toy regression.
Then merge, unmerge, save and load the adapters."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import loratch


def main() -> None:
    torch.manual_seed(0)
    in_features, out_features, rank = 64, 32, 4
    layer = loratch.torch_lora_linear(in_features, out_features, rank, alpha=8.0)
    print(layer)

    # The target: the frozen base layer plus a rank-4 change the adapter has to discover.
    hidden = (torch.randn(out_features, rank) @ torch.randn(rank, in_features)) * 0.1
    x = torch.randn(1024, in_features)
    with torch.no_grad():
        y = x @ (layer.weight + hidden).T + layer.bias

    params = loratch.torch_lora_trainable_params(layer)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    first = last = float("nan")
    for step in range(201):
        loss = torch.nn.functional.mse_loss(loratch.torch_lora_forward(layer, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = loss.item()
        last = loss.item()
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.3e}")
    print(f"loss fell from {first:.3e} to {last:.3e}")

    layer.eval()
    with torch.no_grad():
        before = loratch.torch_lora_forward(layer, x)
        loratch.torch_lora_merge_weights(layer)
        merged = loratch.torch_lora_forward(layer, x)
        loratch.torch_lora_unmerge_weights(layer)
    print(f"merged vs unmerged max |diff|: {(merged - before).abs().max().item():.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        loratch.torch_lora_save_adapters(layer, path)
        fresh = loratch.torch_lora_linear(in_features, out_features, rank, alpha=8.0)
        loratch.torch_lora_load_adapters(fresh, path)
        same = torch.equal(fresh.lora_B, layer.lora_B) and torch.equal(fresh.lora_A, layer.lora_A)
        print(f"saved {path.stat().st_size} bytes of adapters; reloaded identical: {same}")


if __name__ == "__main__":
    main()
