"""Training from scratch: token files and packing, the loss, and a straight-line loop.

    tokens.py    token files, packing rows with positions, the batch order
    loss.py      chunked next-token cross-entropy from the final hidden states
    settings.py  TrainSettings, TrainResult, the model shape (no torch)
    loop.py      decay groups, learning rate, checkpoints, export, evaluate, train

Names are imported on first use (PEP 562), so that the command line reads
TrainSettings' defaults without loading torch.
"""

from rgemma._lazy import lazy_exports

_EXPORTS = {
    "rgemma.train.tokens": ("IGNORE", "TokenFile", "write_token_file", "tokenize_corpus", "pack_row", "batch",
                            "row_order", "batch_rows"),
    "rgemma.train.loss": ("next_token_loss",),
    "rgemma.train.settings": ("LOSS_CHUNK", "TrainSettings", "TrainResult", "model_config"),
    "rgemma.train.loop": ("CHECKPOINT_FILE", "LOG_FILE", "BEST_DIR", "FINAL_DIR", "decayed_parameters",
                          "parameter_groups", "learning_rate", "autocast", "evaluate", "train"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)
__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
