"""Tiny offline models, a character tokenizer and toy tasks for running the real trainers of TRL
(and verl's model code) on CPU in seconds, without downloads."""

from __future__ import annotations

import torch

CHARS = "0123456789+-=*/ abcdefghijklmnopqrstuvwxyz"


def tokenizer():
    """A character-level PreTrainedTokenizerFast (ids: <s> 0, </s> 1, <pad> 2, then CHARS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    # Conversations (GKD's collator) as their plain concatenation, each assistant turn ended by </s>.
    out.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    )
    return out


def causal_lm(kind: str = "llama", seed: int = 0, hidden_size: int = 32, **overrides):
    """A 2-layer random causal LM over the tokenizer's vocabulary; ``kind`` "llama", "gemma2"
    (final_logit_softcapping) or "granite" (logits_scaling)."""
    import transformers

    common = dict(vocab_size=len(CHARS) + 3, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1,
                  bos_token_id=0, pad_token_id=2, tie_word_embeddings=False)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common, **overrides),
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8, **overrides),
        "granite": lambda: transformers.GraniteConfig(**common, **overrides),
    }[kind]()
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def save_model_and_tokenizer(path, kind: str = "llama", seed: int = 0, **model) -> str:
    """Writes a tiny model and the tokenizer to `path` (trainers that build a reference or teacher
    model from the policy's path need one); returns it as a str."""
    causal_lm(kind, seed, **model).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def addition_prompts(n: int = 8) -> list[str]:
    return [f"{a}+{b}=" for a, b in zip(range(1, n + 1), range(n, 0, -1))]


def addition_conversations(n: int = 8) -> list[list[dict]]:
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": str(eval(p[:-1]))}]
            for p in addition_prompts(n)]


def digit_reward(completions, **_):
    """Fraction of digits in each completion: a reward the random policy gets partly right."""
    return [sum(c.isdigit() for c in text) / (1 + len(text)) for text in completions]
