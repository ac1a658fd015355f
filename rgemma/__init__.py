"""rgemma: run, serve and train RecurrentGemma / Griffin language models."""

from rgemma.config import Config
from rgemma.model import Griffin
from rgemma.state import State

__all__ = ["Config", "Griffin", "State", "load_model", "save_model"]
__version__ = "0.1.0"


def __getattr__(name):
    # Checkpoint code pulls in safetensors; import it on first use.
    if name in ("load_model", "save_model"):
        from rgemma import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'rgemma' has no attribute {name!r}")
