"""The decoding step: replayed from a CUDA graph on CUDA devices, one native call on CPUs.

A Griffin decode step is several hundred small kernels. On a GPU at small
batch sizes their launches, not the weight reads, set its time, so the step
(`Griffin.step`) is captured once per batch size into a CUDA graph and
replayed: one launch per token. On a CPU their fixed costs (Python, torch's
dispatch) came to about 40 ms of a 2b step, so there the whole step, from
the embedding to the logits, is one call to the native Decoder
(rgemma/csrc/cpu_kernels.cpp), which the tests compare with the model's own
forward. A state it cannot update in place, and every other device, take
the plain forward.

A captured graph reads and writes fixed buffers: a state passed in is copied
into them unless it is the state the previous call returned, so a loop that
always passes back what it got copies nothing.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from rgemma import kernels
from rgemma.model import Embedding, Griffin, Linear, rope_frequencies
from rgemma.quantize import Int8Linear
from rgemma.state import State


class _CapturedStep:
    """`model.step` for one batch size, captured with its input and state buffers."""

    def __init__(self, model: Griffin, tokens: torch.Tensor, state: State, pool):
        self.tokens = tokens.clone()  # (B, 1)
        self.state = state.clone()
        # Capture needs every lazy initialisation (cuBLAS handles, kernel
        # selection) done, on a side stream, and must not advance the state.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.step(self.tokens, self.state.clone())
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            stepped = self.state.map(lambda t: t)  # the same tensors; the step rebinds some fields
            self.logits = model.step(self.tokens, stepped)  # (B, V)
            for buffer, new in zip(self.state.tensors(), stepped.tensors()):
                if new is not buffer:
                    buffer.copy_(new)

    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if state is not self.state:
            for buffer, value in zip(self.state.tensors(), state.tensors()):
                buffer.copy_(value)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits.clone(), self.state


class _NativeStep:
    """`model.step` on a CPU: one native call, from the tokens' embedding to the soft-capped logits."""

    def __init__(self, model: Griffin):
        self.model = model
        self._decoder = None

    @staticmethod
    def supports(model: Griffin) -> bool:
        """A CPU model computing in float32 whose linear layers are all in formats the Decoder reads."""
        if model.device.type != "cpu" or model.activation_dtype != torch.float32 or kernels.native() is None:
            return False
        for module in (model.embed_tokens, *(m for layer in model.layers for m in layer.modules())):
            if isinstance(module, (Linear, Embedding)) and not (
                module.weight.dtype in (torch.float32, torch.bfloat16) and module.weight.is_contiguous()
            ):
                return False
            if isinstance(module, Int8Linear) and not module._fits_kernel():
                return False
        return True

    def _current_decoder(self):
        """The Decoder over the model's tensors, built again when any of them changed in place or moved: it
        holds float32 copies of the small ones."""
        if self._decoder is None or not self._decoder.is_current():
            model, config = self.model, self.model.config
            blocks = [dict(layer.state_dict(keep_vars=True)) for layer in model.layers]
            head = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()
                    if not name.startswith("layers.")}  # embed_tokens.*, final_norm.weight
            self._decoder = kernels.native().Decoder(
                blocks, config.norm_eps, rope_frequencies(config.head_dim, config.rope_base, model.device),
                head, config.embedding_scale, config.logits_soft_cap,
            )
        return self._decoder

    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State] | None:
        """None, with the state unchanged, if its tensors are not laid out as the Decoder updates them in place
        (float32 recurrences, float32 or bfloat16 rings, contiguous)."""
        positions = state.position.contiguous()  # (B,)
        logits = self._current_decoder().step(tokens[:, 0].contiguous(), positions, state.layer_tensors())
        if logits is None:
            return None
        state.position = positions + 1
        return logits, state


class DecodeStep:
    """step(tokens (B, 1), state) -> (next-token logits (B, V) float32, the state to pass next).

    On CUDA a batch size is captured the second time in a row it is seen (the
    first call runs eagerly and warms up), and the last MAX_GRAPHS sizes are
    kept; RGEMMA_CUDA_GRAPHS=0 turns graphs off. The state passed in is
    updated in place unless a graph replays, in which case the returned
    state holds the result.
    """

    MAX_GRAPHS = 4

    def __init__(self, model: Griffin, use_graphs: bool | None = None):
        self.model = model
        if use_graphs is None:
            use_graphs = model.device.type == "cuda" and os.environ.get("RGEMMA_CUDA_GRAPHS", "1") != "0"
        self.use_graphs = use_graphs
        self._graphs: OrderedDict[int, _CapturedStep] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._last_batch: int | None = None
        self._native = _NativeStep(model) if not self.use_graphs and _NativeStep.supports(model) else None

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        batch = tokens.shape[0]
        captured = self._graphs.get(batch)
        if captured is None and self.use_graphs and batch == self._last_batch:
            captured = self._graphs[batch] = _CapturedStep(self.model, tokens, state, self._pool)
            if len(self._graphs) > self.MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._last_batch = batch
        stepped = self._native(tokens, state) if captured is None and self._native is not None else None
        if stepped is not None:
            return stepped
        if captured is None:  # the plain forward: on CPUs it skips the masks `step` keeps for capture
            logits, state = self.model(tokens, state=state)
            return logits[:, -1], state
        self._graphs.move_to_end(batch)
        return captured(tokens, state)
