"""``spadeformer data``: generate the synthetic LRA data sets in their release layouts."""

from __future__ import annotations

import argparse
import json

from spadeformer.cli_format import HelpFormatter

__all__ = ["add_data_parser"]


def _listops(args: argparse.Namespace) -> int:
    from spadeformer.data.listops import generate_listops

    paths = generate_listops(args.out, n_train=args.train, n_val=args.val, n_test=args.test,
                             seed=args.seed, min_length=args.min_length,
                             max_length=args.max_length, overwrite=args.overwrite)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _pathfinder(args: argparse.Namespace) -> int:
    from spadeformer.data.pathfinder import generate_pathfinder

    result = generate_pathfinder(args.out, size=args.size, count=args.count, seed=args.seed,
                                 overwrite=args.overwrite)
    print(json.dumps({"root": str(result["root"]), "count": result["count"],
                      "metadata_files": len(result["metadata"])}, indent=2))
    return 0


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="generate LRA data sets (ListOps, Pathfinder)",
                       formatter_class=HelpFormatter,
                       description="Write synthetic LRA data in the official release layout.")
    kinds = p.add_subparsers(dest="data_command", required=True, metavar="DATASET")

    q = kinds.add_parser("listops", help="LRA ListOps: basic_{train,val,test}.tsv",
                         formatter_class=HelpFormatter)
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--train", type=int, default=96_000, help="training examples")
    q.add_argument("--val", type=int, default=2_000, help="validation examples")
    q.add_argument("--test", type=int, default=2_000, help="test examples")
    q.add_argument("--seed", type=int, default=0, help="generator seed")
    q.add_argument("--min-length", type=int, default=500,
                   help="keep expressions longer than this many tokens, brackets not counted")
    q.add_argument("--max-length", type=int, default=2_000,
                   help="keep expressions shorter than this many tokens, brackets not counted "
                        "(a line holds up to ~2.8x as many with its brackets)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the ListOps files already in --out (else refused)")
    q.set_defaults(handler=_listops)

    q = kinds.add_parser("pathfinder", help="Pathfinder (32x32) or Path-X (128x128) images",
                         formatter_class=HelpFormatter)
    q.add_argument("--out", required=True, help="output folder (gets imgs/ and metadata/)")
    q.add_argument("--size", type=int, choices=[32, 128], default=32,
                   help="image side: 32 = Pathfinder, 128 = Path-X")
    q.add_argument("--count", type=int, default=200_000,
                   help="number of images (~300 per second on a 2-core CPU)")
    q.add_argument("--seed", type=int, default=0, help="generator seed")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the imgs/ and metadata/ already in --out (else refused)")
    q.set_defaults(handler=_pathfinder)
