"""LRA ListOps: the generator of the Long Range Arena release and a loader for its TSV files.

**The task** (Nangia & Bowman 2018, long version in LRA, Tay et al. 2021; SPADE paper Table 1):
nested lists of digits 0-9 under the operators MIN, MAX, MED (median, rounded down) and SM
(sum modulo 10); the label is the value of the whole expression (10 classes).

**The generator** follows the LRA release's algorithm and parameters
(``lra_benchmarks/data/listops.py``): a tree is drawn top-down from depth 1; at a node of depth
below ``max_depth`` a uniform draw ``r`` makes it an operator when ``r <= 0.25``
(``operator_prob``), else a uniform digit; nodes at ``max_depth`` are digits. An operator node
draws ``randint(2, max_args)`` children, then its operator uniformly (in that order: the draws
below match the release's call sequence, see :func:`sample_tree_ref`). The *length* of a tree is
the number of non-bracket tokens (one per digit, two per operator: ``[OP`` and ``]``); trees
with ``min_length < length < max_length`` are kept, duplicates dropped, and the first
``n_train`` / ``n_val`` / ``n_test`` unique trees form the splits (the release split a Python
set in hash order, i.e. an arbitrary order of the same i.i.d. draws).

**Speed.** Drawing trees naively spends most of its time on trees far longer than
``max_length`` that are then thrown away. :func:`sample_tree` stops drawing as soon as the
partial tree reaches ``max_length`` tokens: such a tree would be rejected anyway, so the
distribution of accepted trees is unchanged (it only shifts later draws of the seeded stream).
About 8 % of drawn trees are accepted; on one CPU core this runs at roughly 500-600 accepted
trees/s, i.e. about 3-4 minutes for the default 100k.

**Text format** of ``basic_{train,val,test}.tsv`` (as written by the release): a header line
``Source<TAB>Target``, then one example per line, ``<expression><TAB><value>``. The release
renders the expression from its left-nested tuples ``(((OP, a), b), ... , ])`` with
``( x y )`` around every pair, so an operator with k arguments is written as k+1 opening
brackets, ``[OP``, the first argument, ``)``, each further argument followed by ``)``, then
``] )``. For example ``[MAX 2 9]`` is written ``( ( ( [MAX 2 ) 9 ) ] )`` and
``[SM 1 [MIN 4 5] ]`` is ``( ( ( [SM 1 ) ( ( ( [MIN 4 ) 5 ) ] ) ) ] )``. Tokens are separated
by single spaces; the writer uses ``\\n`` line ends (the loader accepts ``\\r\\n`` too).

**The loader** (:class:`ListOpsDataset`) reads that format, or the same without brackets. The
vocabulary is fixed (:data:`VOCAB`, 18 ids: pad, digits, 4 operators, ``]``, ``(``, ``)``) so ids
do not depend on the file. By default the ``(`` ``)`` tokens are dropped, as the LRA and S4
input pipelines do, so every release example fits the task's maximum length of 2000; longer
sequences are truncated to ``max_length`` (the LRA input pipeline's ``[:max_length]``) or, with
``truncate=False``, rejected with an error naming the line.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from spadeformer.data.lra_common import (
    CorruptFileError,
    RaggedArray,
    classification_item,
    require_file,
)
from spadeformer.fileio import atomic_write_all

__all__ = [
    "OPERATORS",
    "VOCAB",
    "TOKEN_TO_ID",
    "ListOpsDataset",
    "evaluate_tokens",
    "generate_listops",
    "sample_tree",
    "sample_tree_ref",
    "tree_ref_to_string",
    "tree_ref_value",
]

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUES = range(10)
VOCAB = ("<pad>", *(str(d) for d in VALUES), *OPERATORS, END, "(", ")")
TOKEN_TO_ID = {t: i for i, t in enumerate(VOCAB)}
_DIGIT_STR = tuple(str(d) for d in VALUES)
HEADER = ("Source", "Target")
_LAYOUT = "a TSV with header 'Source<TAB>Target' and lines '<expression><TAB><digit>' (LRA ListOps)"


def _apply(op: str, args: list[int]) -> int:
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == SUM_MOD:
        return sum(args) % 10
    s = sorted(args)  # MED: the release takes int(np.median(args)) -> floor of the midpoint
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


class _TooLong(Exception):
    pass


def sample_tree(
    rng: random.Random,
    max_depth: int = 10,
    max_args: int = 10,
    max_length: int | None = None,
    operator_prob: float = 0.25,
) -> tuple[list[str], int, int] | None:
    """Draw one ListOps tree.

    Returns ``(tokens, value, length)``: ``tokens`` in the release's bracketed text form,
    ``value`` its label, ``length`` its number of non-bracket tokens. Returns None as soon as
    the partial tree reaches ``max_length`` non-bracket tokens (it could only be rejected).
    With ``max_length=None`` the random draws are exactly those of :func:`sample_tree_ref`.
    """
    out: list[str] = []
    count = [0]
    limit = float("inf") if max_length is None else max_length
    rand, choice, randint = rng.random, rng.choice, rng.randint

    def node(depth: int) -> int:
        # Same draw order as the release: r, then a digit or (n_args, children..., operator).
        r = rand() if depth < max_depth else 1.0
        if r > operator_prob:
            v = choice(VALUES)
            out.append(_DIGIT_STR[v])
            count[0] += 1
            if count[0] >= limit:
                raise _TooLong
            return v
        n = randint(2, max_args)
        count[0] += 2  # "[OP" and "]"
        if count[0] >= limit:
            raise _TooLong
        out.extend(["("] * (n + 1))  # one "(" per nested pair of the left-nested tuple
        op_at = len(out)
        out.append("")  # placeholder: the operator is drawn after the children
        args = []
        for _ in range(n):
            args.append(node(depth + 1))
            out.append(")")
        out.append(END)
        out.append(")")
        op = choice(OPERATORS)
        out[op_at] = op
        return _apply(op, args)

    try:
        value = node(1)
    except _TooLong:
        return None
    return out, value, count[0]


def sample_tree_ref(
    rng: random.Random, depth: int = 1, max_depth: int = 10, max_args: int = 10,
    operator_prob: float = 0.25,
) -> tuple[object, int]:
    """Reference twin of :func:`sample_tree`: the release's nested-tuple construction.

    Returns ``(tree, length)`` where an operator with arguments a, b, c is the left-nested
    tuple ``((((OP, a), b), c), "]")``; see :func:`tree_ref_to_string`, :func:`tree_ref_value`.
    """
    r = rng.random() if depth < max_depth else 1.0
    if r > operator_prob:
        return rng.choice(VALUES), 1
    n = rng.randint(2, max_args)
    length = 2
    values = []
    for _ in range(n):
        t, sub = sample_tree_ref(rng, depth + 1, max_depth, max_args, operator_prob)
        values.append(t)
        length += sub
    tree: object = (rng.choice(OPERATORS), values[0])
    for v in values[1:]:
        tree = (tree, v)
    return (tree, END), length


def tree_ref_to_string(tree: object) -> str:
    """Render a :func:`sample_tree_ref` tree as the release does: ``( left right )``."""
    if isinstance(tree, tuple):
        return f"( {tree_ref_to_string(tree[0])} {tree_ref_to_string(tree[1])} )"
    return str(tree)


def tree_ref_value(tree: object) -> int:
    """Evaluate a :func:`sample_tree_ref` tree."""

    def walk(t: object):
        if not isinstance(t, tuple):
            return t
        left, right = walk(t[0]), walk(t[1])
        if left in OPERATORS:
            return (left, [right])
        if right == END:
            return _apply(left[0], left[1])
        return (left[0], left[1] + [right])

    return walk(tree)


def evaluate_tokens(tokens: list[str]) -> int:
    """Value of an expression given as tokens, with or without ``(`` ``)``."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for tok in tokens:
        if tok in ("(", ")"):
            continue
        if tok in OPERATORS:
            stack.append((tok, []))
        elif tok == END:
            op, args = stack.pop()
            v = _apply(op, args)
            if stack:
                stack[-1][1].append(v)
            else:
                result = v
        else:
            v = int(tok)
            if stack:
                stack[-1][1].append(v)
            else:
                result = v
    if stack or result is None:
        raise ValueError(f"unbalanced ListOps expression: {' '.join(tokens[:20])} ...")
    return result


def generate_listops(
    out_dir: str | os.PathLike,
    n_train: int = 96_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2_000,
    max_depth: int = 10,
    max_args: int = 10,
    task_name: str = "basic",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Generate the LRA ListOps data set and write ``<task_name>_{train,val,test}.tsv``.

    Args:
        out_dir: folder to write into (created if missing).
        n_train: number of training examples (release: 96,000).
        n_val: number of validation examples (release: 2,000).
        n_test: number of test examples (release: 2,000).
        seed: seed of the ``random.Random`` stream; equal seeds give identical files.
        min_length: keep trees with strictly more non-bracket tokens than this (release: 500).
        max_length: keep trees with strictly fewer non-bracket tokens than this (release: 2000).
        max_depth: maximum tree depth, the root being depth 1 (release: 10).
        max_args: maximum number of arguments of an operator, at least 2 (release: 10).
        task_name: file prefix (release: ``basic``).
        progress: show a tqdm progress bar.
        overwrite: replace existing ``<task_name>_{train,val,test}.tsv`` (else they are
            refused before anything is generated: a run may be reading them). The three files
            are replaced together (:func:`spadeformer.fileio.atomic_write_all`): an
            interruption leaves the old set whole.

    Returns:
        ``{"train": path, "val": path, "test": path}``.
    """
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if min_length < 0 or max_length <= min_length + 1:
        raise ValueError(
            f"need 0 <= min_length and max_length > min_length + 1, got "
            f"min_length={min_length}, max_length={max_length}"
        )
    if max_depth < 2:
        raise ValueError(f"max_depth must be >= 2 (depth 1 is the root), got {max_depth}")
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2, got {max_args}")
    out = Path(out_dir)
    targets = {split: out / f"{task_name}_{split}.tsv" for split in ("train", "val", "test")}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} already holds ListOps files {existing}: pass "
                              "overwrite=True (--overwrite) to replace them, or another folder")
    total = n_train + n_val + n_test
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    bar = tqdm(total=total, desc="ListOps", unit="tree", disable=not progress)
    while len(rows) < total:
        drawn = sample_tree(rng, max_depth, max_args, max_length)
        if drawn is None:
            continue
        tokens, value, length = drawn
        if not min_length < length < max_length:
            continue
        text = " ".join(tokens)
        if text in seen:
            continue
        seen.add(text)
        rows.append((text, value))
        bar.update(1)
    bar.close()

    out.mkdir(parents=True, exist_ok=True)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
              "test": (n_train + n_val, total)}

    def writer(lo: int, hi: int) -> Callable[[str], None]:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write("\t".join(HEADER) + "\n")
                for text, value in rows[lo:hi]:
                    f.write(f"{text}\t{value}\n")
        return write

    atomic_write_all([(targets[split], writer(lo, hi)) for split, (lo, hi) in bounds.items()])
    return targets


def _read_rows(path: Path) -> Iterator[tuple[int, str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if lineno == 1 and tuple(fields) == HEADER:
                continue
            if len(fields) != 2:
                raise CorruptFileError(
                    f"{path}:{lineno}: expected 2 tab-separated fields (Source, Target), got "
                    f"{len(fields)}; expected {_LAYOUT}"
                )
            yield lineno, fields[0], fields[1]


class ListOpsDataset(Dataset):
    """LRA ListOps examples from a release TSV (``basic_train.tsv`` etc.).

    Args:
        path: the TSV file.
        max_length: maximum sequence length (LRA ListOps: 2000).
        truncate: cut longer sequences to ``max_length`` (LRA behaviour); if False, raise.
        keep_brackets: keep the ``(`` ``)`` tokens (ids 16, 17); by default they are dropped.

    Items: ``{"input_ids": LongTensor (L,), "labels": LongTensor ()}`` with ids from
    :data:`VOCAB` (0 = pad). ``vocab_size`` is 18, ``num_classes`` 10.
    """

    vocab_size = len(VOCAB)
    num_classes = 10

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 2000,
        truncate: bool = True,
        keep_brackets: bool = False,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.path = require_file(path, _LAYOUT)
        seqs: list[np.ndarray] = []
        labels: list[int] = []
        for lineno, source, target in _read_rows(self.path):
            if not keep_brackets:  # cheap pre-filter; stray brackets are dropped by id below
                source = source.replace("( ", "").replace(" )", "")
            try:
                ids = np.array([TOKEN_TO_ID[t] for t in source.split()], dtype=np.uint8)
            except KeyError as e:
                raise CorruptFileError(
                    f"{self.path}:{lineno}: unknown token {e.args[0]!r}; allowed tokens are "
                    f"{list(VOCAB[1:])}"
                ) from None
            if not keep_brackets:
                ids = ids[ids < TOKEN_TO_ID["("]]
            if len(ids) == 0:
                raise CorruptFileError(f"{self.path}:{lineno}: empty expression")
            if len(ids) > max_length:
                if not truncate:
                    raise ValueError(
                        f"{self.path}:{lineno}: sequence has {len(ids)} tokens > max_length="
                        f"{max_length}; raise max_length or pass truncate=True"
                    )
                ids = ids[:max_length]
            # "7" (the release) or "7.0" (a TSV re-saved by pandas); not "1e0", "nan", "inf"
            digit = target.strip()
            if digit.endswith(".0"):
                digit = digit[:-2]
            if len(digit) != 1 or digit not in "0123456789":
                raise CorruptFileError(
                    f"{self.path}:{lineno}: Target must be a digit 0-9, got {target!r}"
                )
            seqs.append(ids)
            labels.append(int(digit))
        if not seqs:
            raise CorruptFileError(f"{self.path} holds no examples; expected {_LAYOUT}")
        self.sequences = RaggedArray(seqs, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return classification_item(self.sequences[i], self.labels[i])
