from ..config import register_method
from .config import QPAConfig
from .generator import QPAGenerator, plan
from .method import QPAMethod

register_method("qpa", QPAConfig, QPAMethod)

__all__ = ["QPAConfig", "QPAGenerator", "QPAMethod", "plan"]
