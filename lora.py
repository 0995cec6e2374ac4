"""LoRA (Hu et al. 2021): low-rank adapters on the linear layers of a frozen network. finetune_cls.py
adapts a ViT's blocks with it, caption.py its decoder (BART or a causal LM); merge_lora folds the
adapters back in, so the exported weights have the plain network's key names."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# qkv/proj of the ViT attention, fc1/fc2 of its GELU MLP, w12/w3 of its SwiGLU MLP (ViT-g)
VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.w12", "mlp.w3")
# the attention and SwiGLU projections of every Llama decoder layer (LLaVA-1.5's LoRA targets)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the attention projections and the MLP of every BART encoder and decoder layer
BART_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) B A x with W and b frozen. A starts random (kaiming-uniform, as the
    LoRA reference code) and B at zero, so training starts from exactly the base model."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    def merged(self):
        """A plain nn.Linear with the low-rank update folded into its weight."""
        base = self.base
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        linear = linear.to(base.weight.device, base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(base.weight + self.scaling * (self.lora_b @ self.lora_a))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear


def add_lora(module, rank, alpha, targets):
    """Freeze `module` and wrap each of its nn.Linear layers whose name ends in one of `targets`
    (e.g. "attn.qkv" matches "blocks.3.attn.qkv") in LoRALinear, in place. Returns the new
    (trainable) LoRA parameters."""
    module.requires_grad_(False)
    names = [name for name, m in module.named_modules()
             if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"add_lora: no linear layer named {targets} in {type(module).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return [p for name, p in module.named_parameters() if ".lora_" in name]


def merge_lora(module):
    """Replace every LoRALinear in `module` by its merged nn.Linear, in place: the result has the plain
    network's state-dict keys again (save_backbone / load_backbone read them)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child, m.merged())
    return module
