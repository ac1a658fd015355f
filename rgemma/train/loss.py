"""Next-token cross-entropy from the model's final hidden states, a chunk of rows at a time.

The loss stays outside the model: training asks the model for its hidden
states (`model(tokens, positions, hidden_only=True)`) and projects them
through the tied embedding here, so the (N, V) logits never exist whole.

Shapes: B batch, T row length, D width, V vocabulary, N = B*T tokens, C chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rgemma.model import Griffin
from rgemma.train.frozen import compute_dtype
from rgemma.train.settings import LOSS_CHUNK
from rgemma.train.tokens import IGNORE


def _chunk_loss(h, weight, target, valid, soft_cap: float, with_grad: bool):
    """Summed loss of one chunk h (C, D), and d(loss)/d(logits before the cap) (C, V) if asked; weight (V, D) is
    in the dtype of the product."""
    # (C, V) tensors are the largest here (a GiB at 1,024 tokens of a 256k vocabulary): each step that can
    # reuses one's memory.
    logits = F.linear(h, weight).float()  # (C, V)
    if soft_cap:
        capped = torch.tanh(logits.div_(soft_cap))
        logits = torch.mul(capped, soft_cap, out=logits)
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    picked = logits.gather(1, target.clamp(min=0)[:, None])[:, 0]
    loss = ((lse - picked) * valid).sum()
    if not with_grad:
        return loss, None
    # d(lse - picked)/dlogits = softmax - onehot; masked rows get zero.
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(target)), target.clamp(min=0)] -= 1.0
    grad.mul_(valid[:, None])
    if soft_cap:
        grad.mul_(capped.square_().neg_().add_(1.0))  # d cap*tanh(z/cap)/dz = 1 - tanh^2
    return loss, grad.to(h.dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of tied soft-capped logits, `chunk` rows at a time.

    The gradient is computed in the forward pass, chunk by chunk, so the (N, V)
    logits and their gradient never exist whole; backward only scales it.
    Must match `Griffin.logits` (tested against it, values and gradients).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, soft_cap: float, chunk: int, count: int | None):
        valid = targets != IGNORE
        count = valid.sum().clamp(min=1) if count is None else count
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        # Not when the embedding is frozen (LoRA): a gradient the size of the embedding, twice, for nothing.
        train_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if train_weight else None
        # Cast once, not per chunk: none under autocast or in the weight's own dtype; a 16-bit frozen
        # embedding read by float32 activations is a float32 copy while the loss is computed.
        product_weight = weight.to(compute_dtype(hidden))
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            h = hidden[part]  # (C, D)
            loss, grad = _chunk_loss(h, product_weight, targets[part], valid[part], soft_cap, with_grad=True)
            total += loss
            grad_hidden[part] = grad @ product_weight
            if train_weight:
                grad_weight += (grad.T @ h).float()
        if grad_weight is not None:
            grad_weight = (grad_weight / count).to(weight.dtype)
        ctx.save_for_backward(grad_hidden / count, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else grad_weight * grad_loss
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight, None, None, None, None


def next_token_loss(model: Griffin, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK,
                    count: int | None = None) -> torch.Tensor:
    """Cross-entropy of hidden (B, T, D) against targets (B, T), summed over the targets that are not IGNORE and
    divided by `count`: by default their number (the mean); with gradient accumulation over micro-batches and
    ranks, the number in the whole step, so that each target weighs the same wherever it falls."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    targets = targets.reshape(-1)
    weight, cap = model.embed_tokens.weight, model.config.logits_soft_cap
    if torch.is_grad_enabled():
        return _ChunkedCrossEntropy.apply(flat, weight, targets, cap, chunk, count)
    valid = targets != IGNORE
    weight = weight.to(compute_dtype(flat))
    total = sum(_chunk_loss(flat[s : s + chunk], weight, targets[s : s + chunk], valid[s : s + chunk], cap, False)[0]
                for s in range(0, len(targets), chunk))
    return total / (valid.sum().clamp(min=1) if count is None else count)
