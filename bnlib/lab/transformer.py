r"""A small pre-norm causal transformer with a pluggable normalization, and what BN does to it.

:class:`CausalTransformer` is a decoder-only language model (token and learned position embeddings,
``n_layers`` pre-norm blocks, a final norm, a linear head). Each block is

.. math::
    h = x + \mathrm{Attn}(\mathrm{norm}_1(x)), \qquad y = h + \mathrm{MLP}(\mathrm{norm}_2(h)),

with causal self-attention (position ``t`` attends to positions ``<= t``). ``norm=`` chooses every norm:

* ``'ln'``: :class:`bnlib.LayerNorm` over the ``d_model`` features of each token;
* ``'rms'``: :class:`bnlib.RMSNorm` over the same features;
* ``'bn'``: :class:`SequenceBatchNorm`, BN over the batch *and time* axes -- every token of every sequence
  is one example of a :class:`bnlib.BatchNorm1d`, so a token's normalization depends on all tokens of the
  batch, the later ones of its own sequence included;
* ``None`` / ``'none'``: no normalization.

LN and RMSNorm are per token, so the model is causal in training and in evaluation. BN in training mode is
not: its mean and variance see the whole batch, and the model can learn to read the future from them. The
measurements below make that visible on a :class:`bnlib.lab.tasks.SequenceTask`:

* :func:`token_losses` with ``stats='batch'`` (training mode, as in training), ``'prefix'`` (training mode,
  but the prediction at position ``t`` uses only positions ``<= t`` of the batch: batch statistics without
  the future) and ``'running'`` (evaluation mode);
* :func:`generate`: greedy token-by-token generation, one sequence at a time (batch size 1, evaluation mode).

Training goes through the book's one loop (:func:`bnlib.lab.training.train_loop`) and its one update, on the
logits of every token (:class:`TokenLogits`): :func:`train_lm`. Nothing fixes a device: the model follows
``.to(device)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import preserved_state
from ..modules import BatchNorm1d
from ..rmsnorm import RMSNorm
from ..variants import LayerNorm
from .probes import Probe
from .tasks import ANSWER, Batch, SequenceTask
from .training import History, Plan, Step, batch_statistics, device, train_loop

__all__ = ["NORMS", "SequenceBatchNorm", "make_token_norm", "CausalTransformer", "TokenLogits", "train_lm",
           "logits", "token_losses", "generate", "answer_accuracy", "STATS", "BatchStatProbe"]

NormSpec = None | str | Callable[[int], nn.Module]

#: The names ``CausalTransformer(norm=...)`` accepts.
NORMS = ("bn", "ln", "rms", "none")

#: Where :func:`token_losses` takes the normalization statistics from.
STATS = ("batch", "prefix", "running")


class SequenceBatchNorm(BatchNorm1d):
    """BN over the batch and time axes of ``(N, T, C)`` token features: each token is one example.

    ``forward(x, mask)`` gathers the tokens where ``mask`` (``(N, T)``, bool) is True -- the real, unpadded
    positions -- into an ``(M, C)`` batch, normalizes it with :class:`bnlib.BatchNorm1d` (batch statistics over
    the ``M`` tokens in training, running statistics in evaluation) and puts the results back in place; padded
    positions are set to 0 and never enter the statistics. Without a mask all ``N·T`` positions are tokens.
    Arguments, parameters and buffers are :class:`bnlib.BatchNorm1d`'s, so the layer is one of the model's BN
    layers for :func:`bnlib.layers.bn_layers` and Precise BN.
    """

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if input.dim() != 3:
            raise ValueError(f"SequenceBatchNorm expected (N, T, C) input, got shape {tuple(input.shape)}")
        if mask is None:
            return super().forward(input.reshape(-1, input.shape[-1])).view_as(input)
        if mask.dtype != torch.bool or mask.shape != input.shape[:2]:
            raise ValueError(f"SequenceBatchNorm expected a bool mask of shape {tuple(input.shape[:2])}, got "
                             f"{mask.dtype} of shape {tuple(mask.shape)}")
        tokens = super().forward(input[mask])  # (M, C): BN over the real tokens only
        return torch.zeros_like(input).masked_scatter(mask[..., None], tokens)


def make_token_norm(norm: NormSpec, d_model: int) -> nn.Module:
    """The normalization layer for ``d_model`` token features named by ``norm`` (see the module docstring)."""
    if norm is None or norm == "none":
        return nn.Identity()
    if callable(norm):
        return norm(d_model)
    if norm == "bn":
        return SequenceBatchNorm(d_model)
    if norm == "ln":
        return LayerNorm(d_model)
    if norm == "rms":
        return RMSNorm(d_model)
    raise ValueError(f"expected norm in {NORMS}, None or a callable d_model -> module, got {norm!r}")


def _norm(layer: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """Apply a token norm; only a sequence BN takes the padding mask (the others are per token)."""
    return layer(x, mask) if isinstance(layer, SequenceBatchNorm) else layer(x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees positions ``0 .. t`` only."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"expected n_heads to divide d_model, got d_model={d_model}, n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q kᵀ/√d_h + causal mask) v
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm block: ``h = x + Attn(norm1(x))``, ``y = h + MLP(norm2(h))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm: NormSpec) -> None:
        super().__init__()
        self.norm1 = make_token_norm(norm, d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.norm2 = make_token_norm(norm, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(_norm(self.norm1, x, mask))
        return x + self.mlp(_norm(self.norm2, x, mask))


class CausalTransformer(nn.Module):
    """Decoder-only transformer: ``model(tokens, mask=None)`` -> logits ``(N, T, vocab_size)``.

    Args:
        vocab_size: number of token ids.
        max_len: the longest sequence (positions have learned embeddings).
        d_model, n_layers, n_heads: width, depth and attention heads.
        d_ff: hidden width of each block's MLP (default ``4 * d_model``).
        norm: ``'bn'``, ``'ln'``, ``'rms'``, ``None``/``'none'`` or a callable ``d_model -> module``.

    ``mask`` (``(N, T)`` bool, True at real tokens) only tells BN which positions enter its statistics;
    attention is causal, so with right padding no real token ever attends to a padded one.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 d_ff: int | None = None, norm: NormSpec = "ln") -> None:
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model, norm) for _ in range(n_layers))
        self.norm = make_token_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for m in self.modules():  # small initial weights (GPT-2's), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"CausalTransformer expected at most max_len={self.max_len} tokens, got {t}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(_norm(self.norm, x, mask))


class TokenLogits(nn.Module):
    """``model``'s logits with the batch and time axes merged, ``(N·T, vocab_size)``: next-token training is then
    the book's one update, :class:`bnlib.lab.training.Step` (cross-entropy against the flattened targets, whose
    ``IGNORE`` entries it skips)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(*inputs).flatten(0, 1)


def train_lm(model: CausalTransformer, task: SequenceTask, *, steps: int, batch_size: int = 32, lr: float = 3e-3,
             weight_decay: float = 0.0, seed: int = 0, masked_stats: bool = True, eval_every: int | None = None,
             eval_batch: Batch | None = None, dev: str | torch.device | None = None,
             probes: Sequence[Probe] = (), probe_every: int = 1) -> History:
    """Train ``model`` on batches of ``task`` with AdamW through :func:`bnlib.lab.training.train_loop`.

    Batch ``i`` is drawn from a generator seeded with ``seed`` (the model's weights are seeded by the
    caller). ``masked_stats=False`` leaves the padding mask out of the forward, so BN's statistics include
    padded positions. The History's ``test_acc`` is :func:`answer_accuracy` on ``eval_batch`` (default: 256
    sequences from seed ``10_000``), teacher-forced in evaluation mode. ``probes`` (e.g. :class:`BatchStatProbe`)
    are switched on for every ``probe_every``-th update. Returns the History.
    """
    dev = device(dev)
    model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    held_out = eval_batch if eval_batch is not None else task.sample(256, torch.Generator().manual_seed(10_000))

    def batches(i: int):
        b = task.sample(batch_size, gen)
        inputs = (b.tokens.to(dev), b.mask.to(dev)) if masked_stats else (b.tokens.to(dev),)
        return inputs, b.targets.flatten().to(dev)  # one target per token, IGNORE at padding

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    every = eval_every or max(1, steps // 10)
    hist = History(config={"model": "CausalTransformer", "task": repr(task), "steps": steps,
                           "batch_size": batch_size, "lr": lr, "seed": seed, "masked_stats": masked_stats,
                           "device": str(dev)})
    plan = Plan(total=steps, eval_every=every, loss_every=every, probe_every=probe_every)
    return train_loop(model, batches, Step(TokenLogits(model), opt), plan, lambda m: answer_accuracy(m, held_out), hist,
                      probes=list(probes))


def _to(batch: Batch, dev: torch.device) -> Batch:
    return Batch(*(t.to(dev) for t in batch))



def logits(model: CausalTransformer, batch: Batch, stats: str = "running") -> Tensor:
    """The model's logits on ``batch``, ``(N, T, vocab_size)``; no gradient, and no trace left in the model.

    ``stats`` says where the normalization statistics come from (it changes nothing for LN/RMSNorm):

    * ``'batch'``: training mode on the whole batch, as in training -- BN sees every position;
    * ``'prefix'``: training mode, but the logits at position ``t`` come from a forward pass over positions
      ``0 .. t`` of the batch only: batch statistics without the future;
    * ``'running'``: evaluation mode (BN's running statistics).

    The model's buffers and train/eval mode are left as they were (:func:`bnlib.lab.training.batch_statistics`).
    """
    if stats not in STATS:
        raise ValueError(f"expected stats in {STATS}, got {stats!r}")
    b = _to(batch, next(model.parameters()).device)
    if stats == "running":
        with preserved_state(model), torch.no_grad():
            return model.eval()(b.tokens, b.mask)
    with batch_statistics(model):
        if stats == "batch":
            return model(b.tokens, b.mask)
        return torch.stack([model(b.tokens[:, :t + 1], b.mask[:, :t + 1])[:, t]  # position t sees 0 .. t
                            for t in range(b.tokens.shape[1])], dim=1)


def token_losses(model: CausalTransformer, batch: Batch, stats: str = "running") -> Tensor:
    """Cross-entropy (nats) of every target of ``batch``, ``(N, T)``, 0 at padding; ``stats`` as in :func:`logits`."""
    out = logits(model, batch, stats)
    return F.cross_entropy(out.transpose(1, 2), batch.targets.to(out.device), reduction="none")


@torch.no_grad()
def generate(model: CausalTransformer, prompt: Tensor, n_new: int) -> Tensor:
    """Greedy generation of ``n_new`` tokens after the 1D ``prompt``, one token at a time, in evaluation mode
    (batch size 1: BN uses its running statistics). Returns the ``n_new`` generated tokens."""
    if prompt.dim() != 1:
        raise ValueError(f"generate expected a 1D prompt (one sequence), got shape {tuple(prompt.shape)}")
    seq = prompt.to(next(model.parameters()).device)[None]
    with preserved_state(model):
        model.eval()
        for _ in range(n_new):
            nxt = model(seq)[:, -1].argmax(-1)  # the most likely next token
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[0, prompt.numel():].cpu()


def answer_accuracy(model: CausalTransformer, batch: Batch, stats: str = "running") -> float:
    """Fraction of the ``ANSWER`` targets of ``batch`` predicted right (argmax), teacher-forced; ``stats`` as in
    :func:`logits`. In evaluation mode the model is causal, so an answer entirely right here is exactly what
    :func:`generate` produces from its prompt."""
    pred = logits(model, batch, stats).argmax(-1).cpu()
    answer = batch.part == ANSWER
    return ((pred == batch.targets) & answer).sum().item() / max(1, answer.sum().item())


class BatchStatProbe(Probe):
    r"""How far a BN layer's batch statistics stray from its running ones during training (Shen et al. 2020).

    Hooked before ``layer``'s forward, on every training-mode pass while the probe is active, it records, over
    the layer's channels :math:`c = 1..C`,

    .. math::
        d_\mu = \frac{1}{C}\sum_c \frac{(\mu_{B,c} - \hat\mu_c)^2}{\hat\sigma^2_c}, \qquad
        d_{\sigma^2} = \frac{1}{C}\sum_c \Big(\frac{\sigma^2_{B,c}}{\hat\sigma^2_c} - 1\Big)^2,

    with :math:`\mu_B, \sigma^2_B` the statistics the layer normalizes this batch with (biased variance, over
    the real tokens for a :class:`SequenceBatchNorm` given a mask, over ``N, H, W`` for a ``BatchNorm2d``) and
    :math:`\hat\mu, \hat\sigma^2` its running statistics before the update. Both are in units of the running
    spread, so layers of different networks and scales compare. Records: ``steps``, ``mean_dev`` (:math:`d_\mu`),
    ``var_dev`` (:math:`d_{\sigma^2}`).
    """

    _records = ("steps", "mean_dev", "var_dev")

    def __init__(self, layer: nn.Module, active: bool = True) -> None:
        super().__init__(active)
        if getattr(layer, "running_mean", None) is None:
            raise ValueError(f"BatchStatProbe expected a BN layer with running statistics, got {type(layer).__name__}")
        self.mean_dev: list[float] = []
        self.var_dev: list[float] = []
        self._add_hook(layer.register_forward_pre_hook(self._hook))

    def _hook(self, layer: nn.Module, args: tuple) -> None:
        if not (self.active and layer.training):
            return
        x = args[0].detach()
        if isinstance(layer, SequenceBatchNorm):
            mask = args[1] if len(args) > 1 else None
            rows = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
        else:  # (N, C, *): channels in dim 1
            rows = x.transpose(0, 1).reshape(x.shape[1], -1).T
        var, mean = torch.var_mean(rows.float(), 0, correction=0)  # σ²_B, μ_B per channel
        run_mean, run_var = layer.running_mean.float(), layer.running_var.float()
        self.steps.append(self._next_step())
        self.mean_dev.append(((mean - run_mean) ** 2 / run_var).mean().item())  # d_μ
        self.var_dev.append(((var / run_var - 1) ** 2).mean().item())  # d_σ²

    def to_dict(self) -> dict[str, object]:
        return {"steps": list(self.steps), "mean_dev": list(self.mean_dev), "var_dev": list(self.var_dev)}
