"""Energy diffusion (IRED) with pluggable negative mining."""
from .diffusion import GaussianDiffusion1D
from .mining import STRATEGIES, Negatives, register, resolve_mining_config
from .models import EBM, EnergyCondition, EnergyDenoiser
from .schedule import schedule_constants

__all__ = [
    "EBM",
    "EnergyCondition",
    "EnergyDenoiser",
    "GaussianDiffusion1D",
    "Negatives",
    "STRATEGIES",
    "register",
    "resolve_mining_config",
    "schedule_constants",
]
