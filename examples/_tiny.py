"""A tiny random causal LM and a GRPO-style batch for the examples (CPU, seconds, no downloads)."""

from __future__ import annotations

import torch


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=1,
        bos_token_id=0, pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).float()


def reward(completions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A toy verifier: 1 if most of the completion's tokens are even, else 0."""
    even = ((completions % 2) == 0) & mask
    return (even.sum(1) * 2 > mask.sum(1)).float()


@torch.no_grad()
def sample_batch(model, n_prompts: int = 4, group: int = 4, prompt_len: int = 8, max_new: int = 16, seed: int = 0):
    """Prompts, sampled completions, their mask (up to and including the first EOS) and
    group-normalized advantages, as a GRPO trainer prepares them."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, model.config.vocab_size, (n_prompts, prompt_len), generator=g)
    prompts = prompts.repeat_interleave(group, 0)
    torch.manual_seed(seed)
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=max_new,
                         min_new_tokens=max_new, temperature=1.0, top_k=0, pad_token_id=2)
    completions = out[:, prompt_len:]
    is_eos = completions == model.config.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    rewards = reward(completions, mask)
    r = rewards.view(n_prompts, group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    return prompts, completions, mask, adv, rewards


def completion_hidden(model, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Final hidden states that predict each completion token ([B, T, H]): the backbone only, no logits."""
    ids = torch.cat([prompts, completions], 1)
    hs = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return hs[:, prompts.shape[1] - 1 : -1]
