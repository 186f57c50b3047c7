"""dsv3: DeepSeek-V3-class models on any hardware through per-hardware operator plugins."""

from .errors import Dsv3Error
from .model.config import ModelConfig, config_from_dict, load_config
from .runtime.engine import Completion, Engine
from .runtime.loading import build_model, load

__all__ = ["Completion", "Dsv3Error", "Engine", "ModelConfig", "build_model", "config_from_dict", "load", "load_config"]
__version__ = "0.1.0"
