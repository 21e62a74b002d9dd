"""The paper's named variants as kernel settings (arXiv 2509.24203 §3; DESIGN.md §3).

``PRESETS`` is the one table to cite: each row gives a preset's non-default fields of
``AdvantageConfig`` / ``LossConfig`` (defaults: no clip, weight ``A``, eps = (0.2, 0.2),
ring eps' = (0.6, 2.0), temp 1 (fixed), no regulariser, token-mean, no std normalisation, no
drop).

    algo = algorithms.get("rec-oneside-nois", eps_high=0.28)
    loss, metrics = losses.policy_loss(logp, behaviour_logp, adv, mask, algo.loss)

Names are matched ignoring case and punctuation (`canonical_name`: the paper's figures spell
``REC-OneSide-NoIS``); an unknown name or field is refused with the closest ones suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from types import MappingProxyType

__all__ = [
    "PRESETS",
    "AdvantageConfig",
    "Algorithm",
    "LossConfig",
    "canonical_name",
    "did_you_mean",
    "get",
    "names",
]

DROP_MODES = ("none", "balance")


def check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")


def check_number(field: str, value, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{field} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """How rewards of one group become advantages.

    Attributes:
      std_normalize: divide by (population std of the group + ``std_eps``) (GRPO).
      drop: ``"none"`` or ``"balance"`` (RED-Drop, needs a PRNG key).
      std_eps: added to the std before dividing.
    """

    std_normalize: bool = False
    drop: str = "none"
    std_eps: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.std_normalize, bool):
            raise ValueError(
                f"std_normalize must be one of (True, False), got {self.std_normalize!r}"
            )
        check_choice("drop", self.drop, DROP_MODES)
        check_number("std_eps", self.std_eps, positive=True)


CLIP_MODES = ("none", "one-side", "two-side", "ring", "gspo-one-side")
WEIGHTS = ("none", "importance_sampling", "gspo_importance_sampling", "advantage")
REGULARIZERS = ("none", "forward-kl", "k2")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
ADAPTIVE_TEMP_LEVELS = ("none", "batch", "group")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """One point in the paper's family of losses (DESIGN.md §3).

    Attributes:
      clip: ``none | one-side | two-side | ring | gspo-one-side``.
      weight: ``none | importance_sampling | gspo_importance_sampling | advantage``.
      eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; ``0 < eps_low <= 1``.
      ring_eps_low, ring_eps_high: the outer ring thresholds ``1 - eps_low'``, ``1 + eps_high'``.
      weight_temp: RED-Weight temperature, weight ``A * exp(A / weight_temp)``.
      adaptive_temp: ``none`` (use ``weight_temp``) ``| batch | group``: adaptive RED-Weight,
        the temperature chosen each step by ``rl_jax.advantages.red_weight_temperature`` over the
        whole batch or per prompt's group (``weight_temp`` is then unused); needs
        ``weight="advantage"``.
      regularizer: ``none | forward-kl`` (AsymRE) ``| k2`` (OPMD); ``reg_coef >= 0`` its coefficient.
      aggregation: ``token-mean`` or ``seq-mean-token-mean`` (GSPO variants).
      log_ratio_bound: log-ratios are clamped to +-this before ``exp`` (module docstring).
      weight_exp_bound: upper clamp of ``A / weight_temp`` before ``exp``.
    """

    clip: str = "none"
    weight: str = "none"
    eps_low: float = 0.2
    eps_high: float = 0.2
    ring_eps_low: float = 0.6
    ring_eps_high: float = 2.0
    weight_temp: float = 1.0
    adaptive_temp: str = "none"
    regularizer: str = "none"
    reg_coef: float = 0.0
    aggregation: str = "token-mean"
    log_ratio_bound: float = 20.0
    weight_exp_bound: float = 20.0

    def __post_init__(self):
        check_choice("clip", self.clip, CLIP_MODES)
        check_choice("weight", self.weight, WEIGHTS)
        check_choice("regularizer", self.regularizer, REGULARIZERS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("adaptive_temp", self.adaptive_temp, ADAPTIVE_TEMP_LEVELS)
        if self.adaptive_temp != "none" and self.weight != "advantage":
            raise ValueError(
                f"adaptive_temp={self.adaptive_temp!r} chooses RED-Weight's temperature, so it "
                f"needs weight='advantage', got weight={self.weight!r}"
            )
        for field in ("eps_low", "eps_high", "ring_eps_low", "ring_eps_high", "weight_temp"):
            check_number(field, getattr(self, field), positive=True)
        for field in ("eps_low", "ring_eps_low"):
            if getattr(self, field) > 1:
                raise ValueError(f"{field} must be in (0, 1], got {getattr(self, field)!r}")
        check_number("reg_coef", self.reg_coef)
        if not self.reg_coef >= 0:
            raise ValueError(f"reg_coef must be >= 0, got {self.reg_coef!r}")
        check_number("weight_exp_bound", self.weight_exp_bound, positive=True)
        check_number("log_ratio_bound", self.log_ratio_bound, positive=True)
        thresholds = [math.log1p(self.eps_high), math.log1p(self.ring_eps_high)]
        thresholds += [-math.log1p(-e) for e in (self.eps_low, self.ring_eps_low) if e < 1]
        if not self.log_ratio_bound > max(thresholds):
            raise ValueError(
                f"log_ratio_bound must exceed every |log clip threshold| ({max(thresholds):.4g}) "
                f"so that clamping never changes a clip decision, got {self.log_ratio_bound!r}"
            )


_GSPO = {"clip": "gspo-one-side", "eps_low": 3e-4, "eps_high": 4e-4}
_GSPO_AGG = {"aggregation": "seq-mean-token-mean"}

# name -> overrides of the defaults. Family: baselines, REC (clipping), REP (regulariser),
# RED (data shaping).
PRESETS = MappingProxyType(
    {
        "reinforce": {},
        "grpo": {"clip": "one-side", "weight": "importance_sampling", "std_normalize": True},
        "rec-oneside-nois": {"clip": "one-side"},
        "rec-oneside-is": {"clip": "one-side", "weight": "importance_sampling"},
        "rec-twoside-is": {"clip": "two-side", "weight": "importance_sampling"},
        "rec-twoside-nois": {"clip": "two-side"},
        "rec-ring-nois": {"clip": "ring", "ring_eps_low": 0.6, "ring_eps_high": 2.0},
        "rec-ring-is": {
            "clip": "ring",
            "weight": "importance_sampling",
            "ring_eps_low": 0.6,
            "ring_eps_high": 2.0,
        },
        "rec-gspo-nois": {**_GSPO, **_GSPO_AGG},
        "rec-gspo-is": {**_GSPO, **_GSPO_AGG, "weight": "gspo_importance_sampling"},
        "rep-asymre": {"regularizer": "forward-kl", "reg_coef": 0.1},
        "rep-opmd": {"regularizer": "k2", "reg_coef": 0.1},
        "red-drop": {"drop": "balance"},
        "red-weight": {"weight": "advantage", "weight_temp": 1.0},
        "red-weight-adaptive": {"weight": "advantage", "adaptive_temp": "batch"},
    }
)

_ADVANTAGE_FIELDS = tuple(f.name for f in dataclasses.fields(AdvantageConfig))
_LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig))


def did_you_mean(word: str, choices, key=lambda text: text) -> str:
    """ "; did you mean 'x'?" naming the choices closest to `word` (difflib's ratio >= 0.6,
    compared through `key`), or "" when none is close."""
    by_key = {key(choice): choice for choice in choices}
    close = difflib.get_close_matches(key(word), list(by_key), n=3, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(by_key[c]) for c in close)}?)"


def _loose(name: str) -> str:
    """`name` lower-cased, with everything but letters and digits dropped."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def canonical_name(name: str, field: str = "name") -> str:
    """The preset `name` stands for: itself, or the one equal to it ignoring case and
    punctuation (``REC-OneSide-NoIS``, ``rec_oneside_nois`` -> ``rec-oneside-nois``).

    Raises:
      ValueError: no preset matches; the message names `field`, lists the presets and
        suggests the closest.
    """
    if name in PRESETS:
        return name
    if isinstance(name, str):
        for preset in PRESETS:
            if _loose(preset) == _loose(name):
                return preset
    hint = did_you_mean(name, PRESETS, key=_loose) if isinstance(name, str) else ""
    raise ValueError(f"{field} must be one of {list(names())}, got {name!r}{hint}")


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    unknown = sorted(set(overrides) - set(_ADVANTAGE_FIELDS) - set(_LOSS_FIELDS))
    if unknown:
        allowed = _ADVANTAGE_FIELDS + _LOSS_FIELDS
        raise ValueError(
            f"unknown override field(s) {unknown}{did_you_mean(unknown[0], allowed)}; "
            f"allowed: {allowed}"
        )
    advantage = {k: v for k, v in overrides.items() if k in _ADVANTAGE_FIELDS}
    loss = {k: v for k, v in overrides.items() if k in _LOSS_FIELDS}
    return advantage, loss


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A named variant: how to compute advantages and the policy loss."""

    name: str
    advantage: AdvantageConfig
    loss: LossConfig

    def replace(self, **overrides) -> Algorithm:
        """A copy with fields of ``advantage`` / ``loss`` overridden by name (validated)."""
        advantage, loss = _split_overrides(overrides)
        return dataclasses.replace(
            self,
            advantage=dataclasses.replace(self.advantage, **advantage),
            loss=dataclasses.replace(self.loss, **loss),
        )


def names() -> tuple[str, ...]:
    """All preset names, in the order of ``PRESETS``."""
    return tuple(PRESETS)


def get(name: str, **overrides) -> Algorithm:
    """The preset ``name`` (see ``PRESETS``; any case and punctuation, `canonical_name`), with
    optional field overrides, e.g. ``eps_high=0.28``."""
    name = canonical_name(name)
    advantage, loss = _split_overrides({**PRESETS[name], **overrides})
    return Algorithm(name=name, advantage=AdvantageConfig(**advantage), loss=LossConfig(**loss))
