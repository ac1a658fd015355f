"""rgemma: run, serve and train RecurrentGemma / Griffin language models."""

import importlib

# Imported on first use (PEP 562): `import rgemma.cli` must not wait for torch.
_EXPORTS = {"Config": "rgemma.config", "Griffin": "rgemma.model", "State": "rgemma.state",
            "load_model": "rgemma.checkpoint", "save_model": "rgemma.checkpoint", "prepare": "rgemma.backends"}

__all__ = ["Config", "Griffin", "State", "load_model", "prepare", "save_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rgemma' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
