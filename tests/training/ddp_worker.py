"""Worker for test_distributed.py, launched as ``torchrun --nproc-per-node 2 ddp_worker.py``.

Trains TinyLM on the byte corpus of ``--root`` with the trainer's data-parallel path and writes
``rank<r>.json`` (its rank, world size and a fingerprint of its final weights) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import TinyLM  # noqa: E402

from spadeformer.data.corpus import ByteCorpus  # noqa: E402
from spadeformer.training import distributed as D  # noqa: E402
from spadeformer.training.trainer import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True, help="TrainConfig as JSON")
    ap.add_argument("--seq-len", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    corpus = ByteCorpus(args.root, fractions=(0.8, 0.1, 0.1))
    torch.manual_seed(0)  # same initial weights as the single-process run (DDP broadcasts anyway)
    model = TinyLM(dropout=0.0)
    config = TrainConfig.from_dict(json.loads(args.config))
    trainer = Trainer(model, corpus.dataset("train", args.seq_len),
                      corpus.dataset("val", args.seq_len), config, args.out)
    trainer.fit()
    info = trainer.dist
    fingerprint = [float(v.double().sum()) for v in model.state_dict().values()]
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(
        {"rank": info.rank, "world_size": info.world_size, "weights": fingerprint}))
    D.cleanup()


if __name__ == "__main__":
    main()
