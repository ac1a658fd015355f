"""rgemma: run, serve and train RecurrentGemma / Griffin language models."""

from rgemma._lazy import lazy_exports

# Imported on first use: `import rgemma.cli` must not wait for torch.
_EXPORTS = {"Config": "rgemma.config", "Griffin": "rgemma.model", "State": "rgemma.state",
            "load_model": "rgemma.checkpoint", "save_model": "rgemma.checkpoint", "prepare": "rgemma.backends"}

__all__ = ["Config", "Griffin", "State", "load_model", "prepare", "save_model"]
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
