"""Adaptive input embeddings and the (tied) adaptive softmax (Baevski & Auli 2019).

The paper's WikiText-103 model (Sec. 4.2, App. C.3) is Baevski & Auli's: the vocabulary,
sorted by frequency, is cut into bands [0, c_0), [c_0, c_1), ..., [c_last, V); band i gets
embeddings of width d_i = d_model // factor**i (1024, 256, 64 for cutoffs [20000, 60000] and
factor 4), so rare words cost few parameters.

Input side (``AdaptiveInput``):  x = P_i E_i[w - lo_i]     E_i: (n_i, d_i), P_i: (d_model, d_i)

Output side (``AdaptiveSoftmax``), a two-level softmax:

    head  = log_softmax([h E_0^T, h W_c^T])      band-0 words + one logit per tail cluster
    log p(w) = head[w]                                      w in band 0
    log p(w) = head[cluster i] + log_softmax(D(h) P_i E_i^T)[w - lo_i]    w in tail band i >= 1

With ``tie_to`` the softmax reuses the input's E_i (every band) and P_i (tail bands) — fairseq's
``--tie-adaptive-weights --tie-adaptive-proj``. As in fairseq, the head scores h directly
against E_0 (d_0 = d_model), so the input's band-0 projection P_0 has no output twin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spadeformer.config import adaptive_band_dims

__all__ = ["AdaptiveInput", "AdaptiveSoftmax", "adaptive_input_ref", "adaptive_loss_ref"]


def _bands(vocab_size: int, cutoffs: Sequence[int]) -> list[tuple[int, int]]:
    """[(lo, hi)] id range of each band."""
    edges = [0, *cutoffs, vocab_size]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _band_index(ids: torch.Tensor, cutoffs: Sequence[int]) -> torch.Tensor:
    """Which band each id falls in: i such that cutoffs[i-1] <= id < cutoffs[i]."""
    edges = torch.tensor(list(cutoffs), dtype=ids.dtype, device=ids.device)
    return torch.bucketize(ids.contiguous(), edges, right=True)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Normalise in fp32 under autocast (bf16 / fp16 logits); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_ints(name: str, value, vocab_size: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype not in (
        torch.int64, torch.int32, torch.int16, torch.uint8
    ):
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be an integer tensor of token ids, got {got}")
    if value.numel() and (value.min() < 0 or value.max() >= vocab_size):
        raise ValueError(f"{name} must hold ids in [0, vocab_size={vocab_size}), got range "
                         f"[{int(value.min())}, {int(value.max())}]")


class AdaptiveInput(nn.Module):
    """Adaptive input embeddings. forward: ids (...) int -> (..., d_model).

    Band i: ``embeddings[i]`` = Embedding(n_i, d_i) and ``projections[i]`` =
    Linear(d_i -> d_model, bias=False). Initialised like fairseq: embeddings N(0, d_i^-1/2),
    projections Xavier-uniform, no padding row. The caller scales by sqrt(d_model) as for a
    plain table (fairseq does too: its decoder multiplies any ``embed_tokens`` output by
    sqrt(d) unless --no-scale-embedding, which the wiki103 architecture does not set).
    """

    def __init__(self, vocab_size: int, d_model: int, cutoffs: Sequence[int],
                 factor: float = 4.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.dims = adaptive_band_dims(vocab_size, d_model, cutoffs, factor)
        self.vocab_size, self.d_model = vocab_size, d_model
        self.cutoffs, self.factor = list(cutoffs), float(factor)
        self.bands = _bands(vocab_size, self.cutoffs)
        self.embeddings = nn.ModuleList(
            [nn.Embedding(hi - lo, d) for (lo, hi), d in zip(self.bands, self.dims, strict=True)])
        self.projections = nn.ModuleList(
            [nn.Linear(d, d_model, bias=False) for d in self.dims])
        for emb, proj, d in zip(self.embeddings, self.projections, self.dims, strict=True):
            nn.init.normal_(emb.weight, std=d ** -0.5)
            nn.init.xavier_uniform_(proj.weight)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, d_model={self.d_model}, cutoffs={self.cutoffs}, "
                f"dims={self.dims}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int in [0, vocab_size) -> embeddings (..., d_model).

        Each band embeds and projects only its own tokens (a dense (V, d_model) table is never
        built; :func:`adaptive_input_ref` builds it to check this path)."""
        flat = ids.reshape(-1).long()  # (N,)
        band = _band_index(flat, self.cutoffs)
        rows, pieces = [], []
        for i, (lo, _) in enumerate(self.bands):
            idx = (band == i).nonzero().squeeze(1)  # (n_i,) positions holding band-i ids
            # a band with no token still runs on zero rows: its parameters stay in the graph
            # (zero gradients), which DistributedDataParallel needs on every rank and step
            rows.append(idx)
            pieces.append(self.projections[i](self.embeddings[i](flat[idx] - lo)))
        vals = torch.cat(pieces)  # (N, d_model), band order
        out = vals.new_empty(flat.shape[0], self.d_model).index_copy(0, torch.cat(rows), vals)
        return out.view(*ids.shape, self.d_model)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent plain embedding table (vocab_size, d_model): row w = P_i E_i[w - lo]."""
        pairs = zip(self.embeddings, self.projections, strict=True)
        return torch.cat([proj(emb.weight) for emb, proj in pairs])


def adaptive_input_ref(module: AdaptiveInput, ids: torch.Tensor) -> torch.Tensor:
    """Reference for :meth:`AdaptiveInput.forward`: look up the dense (V, d_model) table."""
    return F.embedding(ids.long(), module.dense_weight())


class AdaptiveSoftmax(nn.Module):
    """Adaptive softmax over ``vocab_size`` words. forward = :meth:`log_prob`.

    Parameters (shapes for band i of width d_i and n_i words; T = number of tail bands):
        ``head_weight``  (n_0, d_model)      band-0 word vectors      (tied: input E_0)
        ``cluster``      Linear(d_model -> T, bias=False), one logit per tail cluster
        ``tail_proj[i-1]``   (d_model, d_i)  h -> h P_i               (tied: input P_i)
        ``tail_weight[i-1]`` (n_i, d_i)      band-i word vectors      (tied: input E_i)
    Untied weights are initialised as the input side is (N(0, d_i^-1/2) word vectors,
    Xavier-uniform projections), so tied and untied models start alike. ``dropout`` is applied
    to h and after each tail projection (fairseq's adaptive-softmax dropout).
    """

    def __init__(self, d_model: int, vocab_size: int, cutoffs: Sequence[int],
                 factor: float = 4.0, tie_to: AdaptiveInput | None = None,
                 dropout: float = 0.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0 <= dropout < 1
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dims = adaptive_band_dims(vocab_size, d_model, cutoffs, factor)
        self.vocab_size, self.d_model = vocab_size, d_model
        self.cutoffs, self.factor = list(cutoffs), float(factor)
        self.bands = _bands(vocab_size, self.cutoffs)
        self.dropout = nn.Dropout(dropout)
        n_tail = len(self.cutoffs)
        self.cluster = nn.Linear(d_model, n_tail, bias=False)
        nn.init.xavier_uniform_(self.cluster.weight)
        if tie_to is not None:
            if not isinstance(tie_to, AdaptiveInput):
                raise TypeError(f"tie_to must be an AdaptiveInput or None, got "
                                f"{type(tie_to).__name__}")
            mine = (vocab_size, d_model, self.cutoffs, self.dims)
            theirs = (tie_to.vocab_size, tie_to.d_model, tie_to.cutoffs, tie_to.dims)
            if mine != theirs:
                raise ValueError(
                    "tie_to must have the same (vocab_size, d_model, cutoffs, band dims) as the "
                    f"softmax: got {theirs} for tie_to and {mine} here"
                )
            # The very Parameter objects of the input: one tensor, one gradient, saved once.
            self.head_weight = tie_to.embeddings[0].weight
            self.tail_proj = nn.ParameterList([p.weight for p in tie_to.projections[1:]])
            self.tail_weight = nn.ParameterList([e.weight for e in tie_to.embeddings[1:]])
        else:
            (lo, hi), d0 = self.bands[0], self.dims[0]
            self.head_weight = nn.Parameter(torch.empty(hi - lo, d0))
            nn.init.normal_(self.head_weight, std=d0 ** -0.5)
            self.tail_proj = nn.ParameterList()
            self.tail_weight = nn.ParameterList()
            for (lo, hi), d in zip(self.bands[1:], self.dims[1:], strict=True):
                proj = nn.Parameter(torch.empty(d_model, d))
                nn.init.xavier_uniform_(proj)
                word = nn.Parameter(torch.empty(hi - lo, d))
                nn.init.normal_(word, std=d ** -0.5)
                self.tail_proj.append(proj)
                self.tail_weight.append(word)
        self.tied = tie_to is not None

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, vocab_size={self.vocab_size}, cutoffs={self.cutoffs}, "
                f"dims={self.dims}, tied={self.tied}")

    # ------------------------------------------------------------ pieces
    def _check_hidden(self, h: torch.Tensor) -> None:
        if not isinstance(h, torch.Tensor) or h.dim() < 1 or h.shape[-1] != self.d_model:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"h must have shape (..., d_model={self.d_model}), got {got}")

    def _head_log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, d) -> (N, n_0 + T) log-probabilities (>= fp32): band-0 words, then clusters."""
        logits = torch.cat([F.linear(h, self.head_weight), self.cluster(h)], dim=-1)
        return F.log_softmax(_at_least_fp32(logits), dim=-1)

    def _tail_log_prob(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Tail band i >= 1: h (n, d) -> (n, n_i) (at least fp32) log p(word | cluster i)."""
        z = self.dropout(h @ self.tail_proj[i - 1])  # (n, d_i)
        return F.log_softmax(_at_least_fp32(F.linear(z, self.tail_weight[i - 1])), dim=-1)

    # ------------------------------------------------------------ public
    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """Full log-probabilities. h (..., d_model) -> (..., vocab_size), at least fp32.

        Builds every word's score: for generation and evaluation. Training should use
        :meth:`loss`, which never materialises the (N, vocab_size) matrix."""
        self._check_hidden(h)
        flat = self.dropout(h.reshape(-1, self.d_model))  # (N, d)
        head = self._head_log_prob(flat)  # (N, n_0 + T)
        n0 = self.bands[0][1]
        parts = [head[:, :n0]]
        for i in range(1, len(self.bands)):
            # log p(w) = log p(cluster i) + log p(w | cluster i)
            parts.append(head[:, n0 + i - 1 : n0 + i] + self._tail_log_prob(i, flat))
        return torch.cat(parts, dim=-1).view(*h.shape[:-1], self.vocab_size)

    forward = log_prob

    def loss(self, h: torch.Tensor, target: torch.Tensor,
             ignore_index: int = -100) -> torch.Tensor:
        """Mean negative log-likelihood. h (N, d_model), target (N,) int -> scalar (>= fp32).

        Targets equal to ``ignore_index`` are skipped (mean over the rest; NaN if none is left,
        as ``F.cross_entropy``). Each tail band's logits are computed only for the rows whose
        target lies in that band, so the cost is N x (n_0 + T) plus, per tail band, its own
        rows x n_i — never N x vocab_size. Equals :func:`adaptive_loss_ref`."""
        if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] != self.d_model:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"h must have shape (N, d_model={self.d_model}), got {got}")
        if not isinstance(target, torch.Tensor) or target.shape != h.shape[:1]:
            got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)
            raise ValueError(f"target must have shape (N={h.shape[0]},), got {got}")
        keep = target != ignore_index
        h, target = self.dropout(h[keep]), target[keep]
        _check_ints("target", target, self.vocab_size)
        target = target.long()
        band = _band_index(target, self.cutoffs)  # (n,)
        n0 = self.bands[0][1]
        # The head scores band-0 targets directly and tail targets through their cluster.
        head_target = torch.where(band == 0, target, n0 + band - 1)
        head = self._head_log_prob(h)
        nll = -head.gather(1, head_target[:, None]).sum()
        for i, (lo, _) in enumerate(self.bands[1:], start=1):
            rows = (band == i).nonzero().squeeze(1)
            # also for zero rows, to keep the band's parameters in the graph (see forward of
            # AdaptiveInput)
            tail = self._tail_log_prob(i, h[rows])  # (rows, n_i) only
            nll = nll - tail.gather(1, (target[rows] - lo)[:, None]).sum()
        return nll / keep.sum()


def adaptive_loss_ref(module: AdaptiveSoftmax, h: torch.Tensor, target: torch.Tensor,
                      ignore_index: int = -100) -> torch.Tensor:
    """Reference for :meth:`AdaptiveSoftmax.loss`: -log_prob(h)[target], mean over counted."""
    return F.nll_loss(module.log_prob(h), target.long(), ignore_index=ignore_index)
