"""Energy diffusion (IRED) with pluggable negative mining.

The public names load on first use (PEP 562), so the command-line tools can parse their arguments, and
answer --help, without importing torch.
"""
from importlib import import_module
from typing import Any

_PUBLIC = {
    "EBM": "models",
    "EnergyCondition": "models",
    "EnergyDenoiser": "models",
    "EnergyModel": "models",
    "MODELS": "models",
    "build_model": "models",
    "register_model": "models",
    "GaussianDiffusion1D": "diffusion",
    "Negatives": "mining",
    "SAMPLERS": "samplers",
    "STRATEGIES": "mining",
    "register": "mining",
    "register_sampler": "samplers",
    "resolve_mining_config": "mining",
    "Option": "registry",
    "resolve_options": "registry",
    "schedule_constants": "schedule",
    "Metric": "tasks",
    "TASKS": "tasks",
    "Task": "tasks",
    "make_task": "tasks",
    "register_task": "tasks",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'diffusion_lib' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
