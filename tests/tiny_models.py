"""Tiny randomly initialised causal LMs sharing the default model's real tokenizer."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(tokenizer, seed: int = 0, eos_scale: float = 0.0, hidden_size: int = 32) -> LlamaForCausalLM:
    """A 2-layer Llama over the tokenizer's vocabulary; eos_scale > 0 makes EOS likely at some positions."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    if eos_scale:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] *= eos_scale
    return model.eval()
