"""The CUDA backend: decode steps replayed from CUDA graphs.

A Griffin decode step is several hundred small kernels. On a GPU at small
batch sizes their launches, not the weight reads, set its time, so the step
(`Griffin.step`, which reads nothing back from the device) is captured once
per batch size into a CUDA graph and replayed: one launch per token.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from rgemma.backends.base import Backend, Options
from rgemma.model import Griffin
from rgemma.state import State


class _CapturedStep:
    """`model.step` for one batch size, captured over the tokens buffer and the state it was first given.

    The graph reads and writes that state's tensors in place; another state
    of the same size is copied in before a replay and out after it.
    """

    def __init__(self, model: Griffin, tokens: torch.Tensor, state: State, pool):
        self.tokens = tokens.clone()  # (B, 1)
        self.state = state
        # Capture needs every lazy initialisation (cuBLAS handles, kernel
        # selection) done, on a side stream, and must not advance the state.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.step(self.tokens, state.clone())
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model.step(self.tokens, state)  # (B, V)

    def __call__(self, tokens: torch.Tensor, state: State) -> torch.Tensor:
        own = state is self.state
        if not own:
            for buffer, value in zip(self.state.tensors(), state.tensors()):
                buffer.copy_(value)
        self.tokens.copy_(tokens)
        self.graph.replay()
        if not own:
            for buffer, value in zip(state.tensors(), self.state.tensors()):
                buffer.copy_(value)
        return self.logits.clone()


class CudaBackend(Backend):
    """A batch size is captured the second time in a row it is seen (the first step runs eagerly and warms up);
    the last MAX_GRAPHS sizes are kept."""

    name = "cuda"
    MAX_GRAPHS = 4

    def __init__(self, model: Griffin, options: Options):
        super().__init__(model, options)
        model.activation_dtype = None
        self.use_graphs = options.cuda_graphs
        self._graphs: OrderedDict[int, _CapturedStep] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._last_batch: int | None = None

    @property
    def decode_path(self) -> str:
        return "graphs" if self.use_graphs else "plain"

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        batch = tokens.shape[0]
        captured = self._graphs.get(batch)
        if captured is None and self.use_graphs and batch == self._last_batch:
            captured = self._graphs[batch] = _CapturedStep(self.model, tokens, state, self._pool)
            if len(self._graphs) > self.MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._last_batch = batch
        if captured is None:
            return super().step(tokens, state)
        self._graphs.move_to_end(batch)
        return captured(tokens, state), state
