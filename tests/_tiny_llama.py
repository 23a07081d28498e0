"""The tiny local Llama the transformers tests share (no hub): 2 layers, 4 query heads sharing 2 KV
heads (GQA), head dim 32 (the quantizers' default group of 32 channels must divide it), vocabulary
128, query/key weights scaled up so that attention is peaked and input-dependent (a random init is
nearly uniform)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(impl: str = "sdpa", dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    net = LlamaForCausalLM(cfg).eval().to(dtype)
    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    net.set_attn_implementation(impl)
    return net
