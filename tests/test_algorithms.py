"""Tests of rl_jax.algorithms: the preset table of DESIGN.md §3, overrides and validation."""

import dataclasses
import re

import pytest

from rl_jax import algorithms

# DESIGN.md §3, transcribed: name -> (clip, weight, std_normalize, other fields).
DESIGN_TABLE = {
    "reinforce": ("none", "none", False, {}),
    "grpo": ("one-side", "importance_sampling", True, {}),
    "rec-oneside-nois": ("one-side", "none", False, {}),
    "rec-oneside-is": ("one-side", "importance_sampling", False, {}),
    "rec-twoside-is": ("two-side", "importance_sampling", False, {}),
    "rec-twoside-nois": ("two-side", "none", False, {}),
    "rec-ring-nois": ("ring", "none", False, {"ring_eps_low": 0.6, "ring_eps_high": 2.0}),
    "rec-ring-is": (
        "ring",
        "importance_sampling",
        False,
        {"ring_eps_low": 0.6, "ring_eps_high": 2.0},
    ),
    "rec-gspo-nois": (
        "gspo-one-side",
        "none",
        False,
        {"eps_low": 3e-4, "eps_high": 4e-4, "aggregation": "seq-mean-token-mean"},
    ),
    "rec-gspo-is": (
        "gspo-one-side",
        "gspo_importance_sampling",
        False,
        {"eps_low": 3e-4, "eps_high": 4e-4, "aggregation": "seq-mean-token-mean"},
    ),
    "rep-asymre": ("none", "none", False, {"regularizer": "forward-kl", "reg_coef": 0.1}),
    "rep-opmd": ("none", "none", False, {"regularizer": "k2", "reg_coef": 0.1}),
    "red-drop": ("none", "none", False, {"drop": "balance"}),
    "red-weight": ("none", "advantage", False, {"weight_temp": 1.0}),
    "red-weight-adaptive": ("none", "advantage", False, {"adaptive_temp": "batch"}),
}
DEFAULTS = {
    "eps_low": 0.2,
    "eps_high": 0.2,
    "regularizer": "none",
    "drop": "none",
    "adaptive_temp": "none",
}


def test_names_are_the_design_table_in_order():
    assert algorithms.names() == tuple(DESIGN_TABLE)


@pytest.mark.parametrize("name", list(DESIGN_TABLE))
def test_preset_matches_design_table(name):
    clip, weight, std_normalize, other = DESIGN_TABLE[name]
    algo = algorithms.get(name)
    assert algo.name == name
    assert (algo.loss.clip, algo.loss.weight) == (clip, weight)
    assert algo.advantage.std_normalize is std_normalize
    fields = {**dataclasses.asdict(algo.loss), **dataclasses.asdict(algo.advantage)}
    for field, value in {**DEFAULTS, **other}.items():
        assert fields[field] == value, field
    aggregation = other.get("aggregation", "token-mean")
    assert algo.loss.aggregation == aggregation


def test_overrides_through_get_and_replace():
    algo = algorithms.get("rec-oneside-nois", eps_high=0.28, std_normalize=True)
    assert algo.loss.eps_high == 0.28 and algo.advantage.std_normalize
    assert algo.loss.clip == "one-side" and algo.loss.eps_low == 0.2
    derived = algo.replace(eps_low=0.1, drop="balance")
    assert (derived.loss.eps_low, derived.loss.eps_high, derived.advantage.drop) == (
        0.1,
        0.28,
        "balance",
    )
    assert derived.name == algo.name and algo.loss.eps_low == 0.2  # the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        algo.loss.eps_low = 0.3


def test_unknown_names_fields_and_values_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="name must be one of .*'grpo'"):
        algorithms.get("ppo")
    with pytest.raises(ValueError, match="unknown override field.*epsilon.*allowed"):
        algorithms.get("grpo", epsilon=0.1)
    with pytest.raises(ValueError, match="unknown override field"):
        algorithms.get("grpo").replace(clip_mode="one-side")
    with pytest.raises(ValueError, match="clip must be one of .*'ring'"):
        algorithms.get("grpo", clip="three-side")
    with pytest.raises(ValueError, match="weight_temp must be > 0"):
        algorithms.get("red-weight").replace(weight_temp=-1.0)
    with pytest.raises(ValueError, match=r"adaptive_temp must be one of \('none', 'batch', 'gr"):
        algorithms.get("red-weight-adaptive", adaptive_temp="task")
    with pytest.raises(ValueError, match="adaptive_temp='group' .* needs weight='advantage'"):
        algorithms.get("grpo", adaptive_temp="group")
    assert (
        algorithms.get("red-weight-adaptive", adaptive_temp="group").loss.adaptive_temp == "group"
    )


def test_names_ignore_case_and_punctuation_and_suggest_the_closest():
    assert algorithms.get("REC-OneSide-NoIS").name == "rec-oneside-nois"  # the figures' spelling
    assert algorithms.canonical_name("rec_ring_IS") == "rec-ring-is"
    assert algorithms.canonical_name("GRPO") == "grpo"
    loose = [re.sub(r"[^0-9a-z]", "", name) for name in algorithms.names()]
    assert len(set(loose)) == len(loose)  # no two presets collide once loosened
    with pytest.raises(ValueError, match=r"got 'grpoo' \(did you mean 'grpo'\?\)$"):
        algorithms.get("grpoo")
    with pytest.raises(
        ValueError, match=r"got 'REC-OneSide-NoIs2' \(did you mean 'rec-oneside-nois'"
    ):
        algorithms.get("REC-OneSide-NoIs2")
    with pytest.raises(ValueError, match=r"got 'ppo'$"):  # nothing close
        algorithms.get("ppo")
    with pytest.raises(ValueError, match=r"^algorithm must be one of .* \(did you mean 'grpo'"):
        algorithms.canonical_name("GRP0", field="algorithm")
    with pytest.raises(ValueError, match=r"\['eps_hgh'\] \(did you mean 'eps_high'"):
        algorithms.get("grpo", eps_hgh=0.3)
