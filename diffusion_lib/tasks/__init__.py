"""The tasks: the base every task builds on (`base`), matrix inversion and its yardsticks, connectivity and
Sudoku. Importing the package registers every task and the models that come with it."""
from diffusion_lib.tasks.base import TASKS, Batch, HeldOutSet, Metric, Task, make_task, register_task
from diffusion_lib.tasks import connectivity, sudoku  # noqa: F401  (registered on import)

__all__ = ["TASKS", "Batch", "HeldOutSet", "Metric", "Task", "make_task", "register_task"]
