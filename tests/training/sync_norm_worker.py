"""Worker for test_distributed.py's synchronised batch norm test, launched as
``torchrun --nproc-per-node 2 sync_norm_worker.py --out DIR``.

Every rank builds the same global batch (seeded), normalises its half with
``MaskedBatchNorm(sync=True)`` in training mode, backpropagates its half of a fixed weighted
sum, and saves its output, gradients and running statistics to ``rank<r>.pt``. Then it
trains a DDP-wrapped Mega classifier with ``mega_norm="syncbatchnorm"`` for two SGD steps on
its half of a batch and saves the weights too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from spadeformer import SpadeConfig
from spadeformer.layers import MaskedBatchNorm
from spadeformer.models import SpadeForSequenceClassification
from spadeformer.training import distributed as D


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (4, 6, 8) fp64, padding (4, 6) with a different count per row, loss weights w."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, generator=g, dtype=torch.float64) * 3 + 1
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[1, 4:] = padding[2, 1:] = padding[3, 5:] = True
    w = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    return x, padding, w


def all_but_rank0_padded() -> torch.Tensor:
    """Padding (4, 6): rank 0's two rows as in global_batch, rank 1's rows all padding."""
    padding = global_batch()[1].clone()
    padding[2:] = True
    return padding


def make_norm() -> MaskedBatchNorm:
    norm = MaskedBatchNorm(8, sync=True).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(8, generator=g, dtype=torch.float64))
    return norm


def mega_classifier() -> SpadeForSequenceClassification:
    cfg = SpadeConfig.from_preset("mega-chunk", "tiny", vocab_size=37, d_model=16, d_ff=32,
                                  chunk_size=4, causal=False, num_labels=3,
                                  mega_norm="syncbatchnorm")
    torch.manual_seed(0)
    return SpadeForSequenceClassification(cfg).double()


def classifier_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (4, 10), labels (4,), padding (4, 10): the rows of both halves differ in padding."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 37, (4, 10), generator=g)
    padding = torch.zeros(4, 10, dtype=torch.bool)
    padding[0, 7:] = padding[3, 3:] = True
    return ids, torch.tensor([0, 2, 1, 2]), padding


def train_two_steps(model, ids, labels, padding) -> None:
    """Two SGD steps on one batch (the loss is the batch's mean)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        model(ids, labels=labels, padding_mask=padding).loss.backward()
        opt.step()
        opt.zero_grad()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    x, padding, w = global_batch()
    half = slice(2 * info.rank, 2 * info.rank + 2)
    x = x[half].clone().requires_grad_(True)
    norm = make_norm().train()
    y = norm(x, padding[half])
    (y * w[half]).sum().backward()
    local = MaskedBatchNorm(8, sync=False).double().train()
    local.load_state_dict(make_norm().state_dict())
    # rank 1 holds only padding: it still takes part in the sums (0 tokens, 0 sum)
    x_pad = x.detach().clone().requires_grad_(True)
    (make_norm().train()(x_pad, all_but_rank0_padded()[half]) * w[half]).sum().backward()
    torch.save({"y": y.detach(), "x_grad": x.grad, "weight_grad": norm.weight.grad,
                "bias_grad": norm.bias.grad, "running_mean": norm.running_mean,
                "running_var": norm.running_var, "y_local": local(x.detach(), padding[half]),
                "x_grad_rank1_padded": x_pad.grad},
               Path(args.out) / f"rank{info.rank}.pt")

    model = mega_classifier()
    ids, labels, padding = classifier_batch()
    train_two_steps(D.wrap_model(model, info), ids[half], labels[half], padding[half])
    torch.save(model.state_dict(), Path(args.out) / f"model{info.rank}.pt")
    D.cleanup()


if __name__ == "__main__":
    main()
