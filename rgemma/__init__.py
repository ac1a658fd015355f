"""rgemma: run, serve and train RecurrentGemma / Griffin language models."""

from rgemma.checkpoint import load_model, save_model
from rgemma.config import Config
from rgemma.model import Griffin
from rgemma.state import State

__all__ = ["Config", "Griffin", "State", "load_model", "save_model"]
__version__ = "0.1.0"
