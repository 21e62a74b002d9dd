"""Tasks with verifiable rewards. GSM8K lives in `rl_jax.tasks.gsm8k` (imported on demand:
its data pipeline needs the optional tensorflow-datasets extra)."""

from rl_jax.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from rl_jax.tasks.base import Example, Task

__all__ = ["ArithmeticConfig", "ArithmeticTask", "Example", "Task"]
