"""The group layout, stated once (arXiv 2509.24203 §3: G responses to each prompt).

A batch of B = num_prompts * G rows is prompt-major: row r answers prompt r // G, so rows
g * G .. g * G + G - 1 are the group of prompt g. The sampler expands prompts to rows with
`rows_from_prompts`, the loop pairs rows with their examples the same way, and the advantage
kernel sees `to_groups(rewards)` of shape `[num_groups, G]`. Works on numpy and JAX arrays.
"""

from __future__ import annotations


def check_group_size(group_size) -> None:
    """G >= 2: each response's advantage is relative to the other responses of its group."""
    if isinstance(group_size, bool) or not (isinstance(group_size, int) and group_size >= 2):
        raise ValueError(
            f"group_size must be an int >= 2 (advantages are relative to the group), "
            f"got {group_size!r}"
        )


def rows_from_prompts(x, group_size: int, axis: int = 0):
    """`[num_prompts, ...]` -> `[num_prompts * G, ...]`, each prompt repeated G times in place
    (along `axis`, the prompt axis)."""
    return x.repeat(group_size, axis=axis)


def to_groups(x, group_size: int):
    """`[num_prompts * G, ...]` -> `[num_prompts, G, ...]`."""
    if x.shape[0] % group_size:
        raise ValueError(f"batch of {x.shape[0]} rows is not whole groups of {group_size}")
    return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])


def from_groups(x):
    """`[num_prompts, G, ...]` -> `[num_prompts * G, ...]`."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def examples_for_rows(examples, group_size: int) -> list:
    """The example each row answers: `[e0, e1]` -> `[e0] * G + [e1] * G`."""
    return [ex for ex in examples for _ in range(group_size)]
