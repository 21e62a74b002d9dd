"""The paper's named variants as kernel settings (arXiv 2509.24203 §3; DESIGN.md §3).

``PRESETS`` is the one table to cite: each row gives a preset's non-default fields of
``AdvantageConfig`` / ``LossConfig`` (defaults: no clip, weight ``A``, eps = (0.2, 0.2),
ring eps' = (0.6, 2.0), temp 1, no regulariser, token-mean, no std normalisation, no drop).

    algo = algorithms.get("rec-oneside-nois", eps_high=0.28)
    loss, metrics = losses.policy_loss(logp, behaviour_logp, adv, mask, algo.loss)
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from rl_jax.advantages import AdvantageConfig
from rl_jax.losses import LossConfig

__all__ = ["PRESETS", "AdvantageConfig", "Algorithm", "LossConfig", "get", "names"]

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
    }
)

_ADVANTAGE_FIELDS = tuple(f.name for f in dataclasses.fields(AdvantageConfig))
_LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig))


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    unknown = sorted(set(overrides) - set(_ADVANTAGE_FIELDS) - set(_LOSS_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown override field(s) {unknown}; allowed: {_ADVANTAGE_FIELDS + _LOSS_FIELDS}"
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
    """The preset ``name`` (see ``PRESETS``), with optional field overrides, e.g. ``eps_high=0.28``."""
    if name not in PRESETS:
        raise ValueError(f"name must be one of {names()}, got {name!r}")
    advantage, loss = _split_overrides({**PRESETS[name], **overrides})
    return Algorithm(name=name, advantage=AdvantageConfig(**advantage), loss=LossConfig(**loss))
