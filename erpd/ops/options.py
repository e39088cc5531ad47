"""`PolicyOptions`: the options of the policy losses, defined once.

`erpd.policy_loss`, `erpd.linear_policy_loss`, their `erpd.nn` modules, `erpd.reference.policy_loss`
and the trainer all take these options, either as one ``options=PolicyOptions(...)`` or as
keyword arguments of the same names (which override ``options``). Values are checked where the
loss runs (`erpd.ops._validate.policy_options`), with errors that name the option.

This module imports nothing from erpd, so that any module (the reference included) can read it.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyOptions:
    r"""How a policy loss turns per-token log-probs into a loss (the formulas:
    :func:`erpd.reference.policy_loss`).

    Attributes:
        method: ``"ppo" | "sapo" | "cispo" | "gspo" | "reinforce"``.
        agg: ``"token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
            "seq-mean-token-sum-norm"``.
        clip_low, clip_high: ppo/gspo clip range ``[1 - clip_low, 1 + clip_high]``
            (``clip_high=None``: symmetric; ``clip_high=math.inf``: no ceiling; ``clip_low=1``:
            no floor).
        dual_clip: ppo/gspo dual clip ``c > 1`` for negative advantages (None: off).
        tau_pos, tau_neg: sapo gate temperatures for positive / non-positive advantages.
        cispo_cap, cispo_floor: cispo's bounds on the detached ratio (absolute values).
        reinforce_cap: reinforce's truncation of the detached ratio (None: none).
        kl_coef, kl_estimator: coefficient and estimator (``k1|k2|k3``) of the KL(π‖π_ref) penalty
            (it needs ``ref_logprobs``; ``ref_logprobs`` without ``kl_coef`` only adds the
            ``kl_ref`` metric).
        kl_ratio_weighted: multiply each token's KL term by the importance ratio of the loss
            (differentiable; DeepSeek-V3.2's unbiased KL gradient, TRL's and Liger's
            ``use_bias_correction_kl``); needs ``ref_logprobs``.
        entropy_coef: coefficient of the entropy bonus.
        norm_length: seq-mean-token-sum-norm's constant (default: the padded length T).
    """

    method: str = "ppo"
    agg: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    cispo_cap: float = 5.0
    cispo_floor: float | None = None
    reinforce_cap: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_ratio_weighted: bool = False
    entropy_coef: float = 0.0
    norm_length: int | None = None

    @classmethod
    def of(cls, options: PolicyOptions | None = None, /, where: str = "the policy loss", **overrides) -> PolicyOptions:
        """`options` (default: the defaults) with `overrides` applied; a TypeError names any key
        that is not an option."""
        if options is not None and not isinstance(options, PolicyOptions):
            raise TypeError(f"{where}: options must be an erpd.PolicyOptions, got {type(options).__name__}")
        unknown = sorted(set(overrides) - set(NAMES))
        if unknown:
            raise TypeError(f"{where}: unknown option(s) {unknown}; known: {sorted(NAMES)}")
        base = cls() if options is None else options
        return dataclasses.replace(base, **overrides) if overrides else base

    def asdict(self) -> dict:
        return {name: getattr(self, name) for name in NAMES}


NAMES = tuple(f.name for f in dataclasses.fields(PolicyOptions))
DEFAULTS = PolicyOptions()


def with_option_parameters(fn):
    """Shows the options as keyword parameters in ``fn``'s signature (help(), IDEs), in place of
    its ``**options``."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(PolicyOptions)]
    fn.__signature__ = sig.replace(parameters=params)
    return fn
