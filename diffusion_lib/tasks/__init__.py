"""The tasks: the base every task builds on (`base`), the matrix tasks and their yardsticks (`matrix`),
connectivity and Sudoku (each with its energy model). Importing the package registers every task and the
models that come with it."""
from diffusion_lib.tasks.base import TASKS, Batch, HeldOutSet, Metric, Task, make_task, register_task
from diffusion_lib.tasks import matrix, connectivity, sudoku  # noqa: F401  (registered on import)

__all__ = ["TASKS", "Batch", "HeldOutSet", "Metric", "Task", "make_task", "register_task"]
