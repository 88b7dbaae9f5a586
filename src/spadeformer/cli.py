"""The ``spadeformer`` command: train | eval | generate | bench | data.

Each subcommand maps to one typed function below; ``spadeformer SUBCOMMAND --help`` documents it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from spadeformer.cli_format import HelpFormatter

__all__ = ["main", "train", "evaluate", "generate_text"]

RUN_CONFIG = "run_config.yaml"
MODEL_DIR = "model"


# ----------------------------------------------------------------------------- train
def train(config: str | None, overrides: list[str], out: str | None = None,
          resume: bool = False) -> dict[str, Any]:
    """Train from a YAML preset plus dotted overrides; returns the final metrics.

    ``resume`` continues the run in ``out``: without ``config`` its own run_config.yaml is the
    starting point (overrides may then change train and data settings, with a warning); the
    model must stay the run's.
    """
    from spadeformer.fileio import atomic_write
    from spadeformer.models import load_pretrained_weights
    from spadeformer.runconfig import RunConfigError, build_model_config, load_run_config
    from spadeformer.tasks import get_task
    from spadeformer.training.trainer import TrainConfig, Trainer, seed_everything

    if resume and out is None:
        raise ValueError("--resume continues the run in --out DIR: pass --out")
    saved = _saved_run_config(out) if resume else None
    if config is None and saved is not None:
        base = {k: dict(saved[k]) for k in ("model", "data", "train")}
        base["model"].pop("init_from", None)  # a record of how the run started, not a setting
        cfg = load_run_config(None, overrides, base=base)
    else:
        cfg = load_run_config(config, overrides)
    cfg["data"] = _absolute_data_paths(cfg["data"])
    source = get_task(cfg["data"])
    task = source.task
    model_section = dict(cfg["model"])
    init_from = model_section.pop("init_from", None)
    if init_from is not None and resume:
        raise ValueError("model.init_from starts a fresh run from saved weights; a resumed run "
                         "continues from its own checkpoint: drop model.init_from")
    model_section.setdefault("vocab_size", task.vocab_size)
    if task.num_labels is not None:
        model_section.setdefault("num_labels", task.num_labels)
    model_config = _model_config(build_model_config, model_section, task)
    train_section = dict(cfg["train"])
    for key, needed in (("task", task.objective), ("lm_metric", task.lm_metric)):
        given = train_section.setdefault(key, needed)
        if given != needed and (key == "task" or task.objective == "lm"):
            raise RunConfigError(f"train.{key}={given!r} contradicts the data: "
                                 f"data.name={cfg['data'].get('name')!r} needs "
                                 f"train.{key}={needed!r} (drop train.{key}, it follows the data)")
    _check_position_limit(model_config, source)
    try:
        train_config = TrainConfig.from_dict(train_section)
    except ValueError as err:  # its messages name fields; on the command line they are train.*
        raise ValueError(f"in the train section (train.*): {err}") from err
    if saved is not None:
        # an older run may have saved relative paths: compare them made absolute too
        saved = {**saved, "data": _absolute_data_paths(saved["data"])}
        _check_same_run(out, saved, model_config.to_dict(), cfg["data"], config is not None)
    if config is None and saved is None and _is_rank_zero():
        _say(f"no --config: the built-in defaults, data.name={cfg['data'].get('name')!r} with "
             f"train.steps={train_config.steps} (configs/README.md lists the presets)")

    if out is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("under torchrun pass --out DIR (every rank must use the same "
                             "run directory)")
        name = Path(config).stem if config else "run"
        out = str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir = Path(out)
    main_process = _is_rank_zero()  # under torchrun only rank 0 writes
    _check_run_dir(out_dir, resume)  # before a model is built: the Trainer would say resume=True

    seed_everything(train_config.seed)  # the initial weights follow train.seed too
    model = task.model_cls()(model_config)
    if init_from is not None:  # every rank loads the same weights (DDP broadcasts them anyway)
        report = load_pretrained_weights(model, init_from)
        if main_process:
            _say(f"init_from {init_from}: {len(report['loaded'])} tensors loaded; fresh: "
                 f"{report['fresh'] or 'none'}; not used: {report['unused'] or 'none'}")
    if main_process:
        _say(f"model: {type(model).__name__}, {model.num_parameters():,} parameters "
             f"({model.num_parameters(trainable_only=True):,} trainable); run dir: {out_dir}")
    # PadCollate for the LRA sources (pads, adds padding_mask[_1/_2]); None = stack LM blocks.
    trainer = Trainer(model, source.dataset("train"), source.dataset("val"), train_config,
                      out_dir, resume=resume, collate_fn=source.collate_fn)
    if resume and main_process:
        _say(f"resuming {out_dir} at step {trainer.step} of train.steps={train_config.steps}")
    if main_process:  # only once the Trainer accepted the run dir (a refusal leaves it alone)
        # the file is a run config itself: `train --config run_config.yaml` repeats the run
        resolved = {"model": model_config.to_dict(), "data": cfg["data"],
                    "train": train_config.to_dict()}
        if init_from is not None:
            resolved["model"]["init_from"] = str(init_from)
        text = f"# task: {task.name}\n" + yaml.safe_dump(resolved, sort_keys=False)
        atomic_write(out_dir / RUN_CONFIG, lambda tmp: Path(tmp).write_text(text))
    if resume and trainer.step >= train_config.steps and main_process and (
            not trainer.validation_pending):
        _say(f"the run is already at step {trainer.step} of train.steps={train_config.steps}: "
             f"nothing to train; pass train.steps=N (N > {trainer.step}) to train it further")
    metrics = trainer.fit()
    if trainer.dist.is_main:
        # The run's model = the best validation checkpoint (the last one if never validated).
        tag = "best" if trainer.ckpt.pointer("best") is not None else "last"
        trainer.ckpt.load(model, tag=tag)
        model.save_pretrained(out_dir / MODEL_DIR)
        _plot_curves(out_dir)
    return metrics


def _absolute_data_paths(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its folder / file options made absolute, so the saved run config still
    finds the data from another working directory (eval, resume)."""
    data = dict(data)
    for key in ("path", "root", "vocab_path", "cache_dir"):
        value = data.get(key)
        if isinstance(value, str) and value:
            data[key] = os.path.abspath(os.path.expanduser(value))
    return data


def _check_run_dir(out_dir: Path, resume: bool) -> None:
    """A fresh run needs a run dir without checkpoints; --resume one with them."""
    from spadeformer.training.checkpoint import CheckpointManager

    last = CheckpointManager(out_dir / "checkpoints").pointer("last")
    if resume and last is None:
        raise FileNotFoundError(f"--out {str(out_dir)!r} holds no run to resume (no checkpoint); "
                                "drop --resume to start one there")
    if not resume and last is not None:
        raise FileExistsError(f"--out {str(out_dir)!r} already holds a run (step {last['step']}): "
                              "add --resume to continue it, or choose another --out")


def _saved_run_config(out: str) -> dict[str, Any] | None:
    """The run_config.yaml of run directory ``out``, or None if it has none."""
    path = Path(out) / RUN_CONFIG
    if not path.is_file():
        return None
    saved = yaml.safe_load(path.read_text())
    if not isinstance(saved, dict) or not all(
        isinstance(saved.get(k), dict) for k in ("model", "data", "train")
    ):
        raise ValueError(f"{path} is not a run config written by `spadeformer train`")
    return saved


def _check_same_run(out: str, saved: dict[str, Any], model: dict[str, Any],
                    data: dict[str, Any], with_config: bool) -> None:
    """--resume continues a run: a changed model is refused (the checkpoint holds its weights),
    a changed data section is allowed with a warning (it changes what the run trains on)."""
    import warnings

    from spadeformer.config import SpadeConfig

    def changes(section: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
        return [f"{section}.{key} ({old.get(key)!r} -> {new.get(key)!r})"
                for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]

    # through SpadeConfig: fields added since the run was made take their defaults; init_from
    # records how the run started, it is no model setting
    saved_model = {k: v for k, v in saved["model"].items() if k != "init_from"}
    changed = changes("model", SpadeConfig.from_dict(saved_model).to_dict(), model)
    if changed:
        how = ("resume without --config to reuse the run's settings (overrides may then change "
               "train.* and data.*)" if with_config else "drop the model.* overrides")
        raise ValueError(
            f"--resume continues the run in {out!r} with the model its {RUN_CONFIG} describes, "
            f"but this command changes {', '.join(changed)}: {how}, or train into a new --out")
    changed = changes("data", saved["data"], data)
    if changed:
        warnings.warn(f"resuming with changed data settings {changed}: the run continues on "
                      "other data than it started with", stacklevel=3)


def _check_position_limit(model_config, source) -> None:
    """Learned positions hold max_position tokens, and so does a full-attention Mega's
    relative bias (``SpadeConfig.position_limit``): refuse data lengths beyond that before any
    training (the first validation would otherwise fail after the training steps)."""
    from spadeformer.runconfig import RunConfigError

    limit = model_config.position_limit
    if limit is None:
        return
    keys = ["seq_len", "eval_seq_len", "max_length", "max_source_length"]  # data.* options
    if model_config.position == "learned":  # the encoder-decoder's decoder learns them too
        why = "position='learned' has one embedding per position"
        keys.append("max_target_length")
    else:  # Mega blocks only in the encoder
        why = "the relative bias of full-attention Mega blocks tells max_position offsets apart"
    for key in keys:
        length = getattr(source, key, None)
        if isinstance(length, int) and length > limit:
            raise RunConfigError(
                f"data.{key}={length} is longer than model.max_position={limit} ({why}): "
                f"raise model.max_position or shorten data.{key}")


def _model_config(build, model_section: dict[str, Any], task):
    """build(model_section), with a hint when the data's vocabulary cannot hold the adaptive
    softmax bands of the size (e.g. the wikitext103 size's [20000, 60000] on a small corpus)."""
    from spadeformer.runconfig import RunConfigError

    try:
        return build(model_section)
    except ValueError as err:
        if "adaptive_cutoffs" not in str(err):
            raise
        raise RunConfigError(
            f"{err}. The data ({task.name}) has a vocabulary of {task.vocab_size} tokens: set "
            f"model.adaptive_cutoffs to increasing ids below it (e.g. "
            f"[{max(1, task.vocab_size // 8)}, {max(2, task.vocab_size // 3)}]) or to null for a "
            "plain softmax") from err


def _plot_curves(out_dir: Path) -> None:
    from spadeformer.training.curves import plot_curves

    try:
        path = plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
        _say(f"curves: {path}")
    except ImportError:
        _say("curves.png skipped: matplotlib is not installed (pip install 'spadeformer[plot]')")


# ----------------------------------------------------------------------------- eval
def _load_run(run: str, data_overrides: list[str] = ()):
    """(run config, data source, model) of a finished run; ``data_overrides`` (``data.*``
    only: the model is the run's) point it at moved data, e.g. ``data.path=/new/place``."""
    from spadeformer.config import SpadeConfig
    from spadeformer.runconfig import apply_override, validate_run_config
    from spadeformer.tasks import get_task

    run_dir = Path(run)
    cfg_path = run_dir / RUN_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory: {RUN_CONFIG} is "
                                "missing (make one with `spadeformer train --out DIR`)")
    cfg = yaml.safe_load(cfg_path.read_text())
    name = cfg["data"].get("name")
    for override in data_overrides:
        if not override.strip().startswith("data."):
            raise ValueError(f"override {override!r}: eval scores the run's own model, so only "
                             "data.* settings may change (e.g. data.path=DIR)")
        apply_override(cfg, override)
    if cfg["data"].get("name") != name:
        raise ValueError(f"data.name is the run's task ({name!r}): eval cannot change it")
    if data_overrides:
        validate_run_config(cfg)  # a misspelled data key is an error, as in train
    cfg["data"] = _absolute_data_paths(cfg["data"])
    if not (run_dir / MODEL_DIR).is_dir() and (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{str(run_dir)!r} has checkpoints but no {MODEL_DIR}/: the model is exported when "
            f"training ends; finish the run with `spadeformer train --out {run_dir} --resume`")
    source = get_task(cfg["data"])
    model = source.task.model_cls().from_pretrained(run_dir / MODEL_DIR)
    assert isinstance(model.config, SpadeConfig)
    return cfg, source, model


def evaluate(run: str, split: str = "test", max_batches: int | None = None,
             batch_size: int | None = None, rouge: bool = False,
             data_overrides: list[str] = ()) -> dict[str, Any]:
    """Metrics of a trained run on a split, with the task's baseline for comparison.

    Runs on CUDA when it is available, else on the CPU. A WikiText-103 run reports the
    paper's evaluation instead of block losses: perplexity ``ppl`` over sliding windows of
    ``data.eval_seq_len`` (= seq_len, 3072) tokens with a context window of ``data.context``
    (400), ``loss`` in nats per word, and ``unigram_ppl``. There ``batch_size`` counts windows
    (default 1: each window's full-vocabulary log-probabilities are held at once) and
    ``max_batches`` limits the windows scored. The baseline (``unigram_*``, majority / chance
    accuracy) is always the whole split's, also when ``max_batches`` scores only part of it.
    ``rouge`` (seq2seq runs): also generate greedy targets for the scored sources and report
    ROUGE-1 / 2 / L against the references (needs ``spadeformer[eval]``).
    ``data_overrides``: ``data.*`` settings over the run's (moved data: ``data.path=DIR``).
    """
    from spadeformer.training.distributed import resolve_device
    from spadeformer.training.trainer import evaluate_model

    for name, value in (("max_batches", max_batches), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive integer (or omitted), got {value!r}")
    cfg, source, model = _load_run(run, data_overrides)
    device = resolve_device("auto")  # a run trained on a GPU can be scored without one
    model.to(device)
    if hasattr(source, "perplexity"):  # word-level LM: perplexity, not bits per byte
        size = 1 if batch_size is None else batch_size
        windows = None if max_batches is None else max_batches * size
        metrics = source.perplexity(model, split, batch_size=size, max_windows=windows,
                                    device=device)
        return {"split": split, **metrics, **source.baseline(split)}
    data = source.dataset(split)
    if batch_size is None:  # one training micro-step: what fit in memory for training
        batch_size = cfg["train"]["batch_size"] // cfg["train"].get("grad_accum", 1)
    if rouge and not hasattr(source, "rouge"):
        raise ValueError(f"--rouge scores generated text: run {run!r} trained "
                         f"{source.task.model_class} on {source.task.name}, not a seq2seq task")
    metrics = evaluate_model(model, data, batch_size=batch_size,
                             task=source.task.objective, lm_metric=source.task.lm_metric,
                             max_batches=max_batches,
                             collate_fn=source.collate_fn)
    if rouge:
        examples = None if max_batches is None else max_batches * batch_size
        metrics.update(source.rouge(model, split, batch_size, examples, device=device))
    return {"split": split, **metrics, **source.baseline(split)}


# ----------------------------------------------------------------------------- generate
def generate_text(run: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = 0.95, seed: int = 0,
                  stream=None, echo_prompt: bool = False,
                  data_overrides: list[str] = ()) -> str:
    """Continue ``prompt`` byte by byte, writing each byte to ``stream`` as it is produced
    (after the prompt itself with ``echo_prompt``, once the run and prompt are checked).
    ``data_overrides`` as in :func:`evaluate` (the run's data source is opened too)."""
    import torch

    from spadeformer.generation import check_decoding_length, check_generate_args, generate

    check_generate_args(max_new_tokens, temperature, top_k, top_p, seed)
    _, source, model = _load_run(run, data_overrides)
    if source.task.model_class == "SpadeForConditionalGeneration":
        return _generate_target(model, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                stream, echo_prompt, source.max_source_length)
    if source.task.objective != "lm":
        raise ValueError(f"run {run!r} trained a {source.task.name} classifier; "
                         "generate needs a language model run")
    if model.config.vocab_size != 256:
        raise ValueError(f"generate reads and writes bytes; run {run!r} is a "
                         f"{source.task.name} model over {model.config.vocab_size} word ids, "
                         "which it does not decode")
    prompt_ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long)
    if prompt_ids.shape[1] == 0:
        raise ValueError("prompt must not be empty")
    check_decoding_length(model, prompt_ids.shape[1], max_new_tokens)
    out = bytearray()
    decoder = _Utf8Stream(stream)
    if echo_prompt and stream is not None:
        stream.write(prompt)

    def on_token(ids):
        out.append(int(ids[0]))
        decoder.feed(int(ids[0]))

    generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
             top_p=top_p, seed=seed, on_token=on_token)
    decoder.flush()
    return out.decode("utf-8", errors="replace")


def _generate_target(model, source_text: str, max_new_tokens: int, temperature: float,
                     top_k: int | None, top_p: float | None, seed: int, stream,
                     echo_prompt: bool, max_source_length: int) -> str:
    """An encoder-decoder run: encode ``source_text`` (cut as in training), then stream the
    target bytes until the end-of-target token or ``max_new_tokens``."""
    from spadeformer.data.seq2seq import EOS_ID, decode_target, encode_source
    from spadeformer.generation import check_decoding_length

    source_ids = encode_source(source_text, max_source_length)[None]
    if source_ids.shape[1] == 0:
        raise ValueError("prompt (the source text) must not be empty")
    check_decoding_length(model, 1, max_new_tokens)
    decoder = _Utf8Stream(stream)
    if echo_prompt and stream is not None:  # what the model reads: cut as in training
        stream.write(decode_target(source_ids[0]) + "\n=> ")

    def on_token(ids):
        if 1 <= int(ids[0]) < EOS_ID:  # a byte (ids are bytes + 1); not padding, not the end
            decoder.feed(int(ids[0]) - 1)

    out = model.generate(source_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, on_token=on_token, eos_token_id=EOS_ID)
    decoder.flush()
    return decode_target(out[0])


class _Utf8Stream:
    """Write bytes to a text stream as soon as they form complete UTF-8 characters."""

    def __init__(self, stream):
        import codecs

        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, byte: int) -> None:
        text = self.decoder.decode(bytes([byte]))
        if text and self.stream is not None:
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        text = self.decoder.decode(b"", final=True)
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- plumbing
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from spadeformer import __version__

    parser = argparse.ArgumentParser(
        prog="spadeformer",
        description="SPADE (State Space Augmented Transformer): train, evaluate, generate, "
                    "benchmark and prepare data.")
    parser.add_argument("--version", action="version", version=f"spadeformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML preset",
                       formatter_class=HelpFormatter,
                       description="Train from --config FILE plus dotted key=value overrides, "
                                   "e.g. `train.steps=100 model.window_size=64`.")
    p.add_argument("--config", help="YAML run config (sections model, data, train); without "
                                    "it the built-in defaults: a byte LM on the Python "
                                    "standard library, 1000 steps")
    p.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where its last checkpoint stopped")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.lr=1e-3 model.ssm_options.d_state=32")

    p = sub.add_parser("eval", help="evaluate a trained run on a split; prints JSON",
                       formatter_class=HelpFormatter,
                       description="Load the model a finished run exported (RUN/model/) and "
                                   "score a split: loss and accuracy, or perplexity / bits "
                                   "per byte, beside the split's baseline; prints JSON.")
    p.add_argument("--run", required=True, help="run directory made by `spadeformer train`")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="which split to score")
    p.add_argument("--max-batches", type=int, default=None,
                   help="score only this many batches (default: the whole split)")
    p.add_argument("--rouge", action="store_true",
                   help="seq2seq runs: also generate (greedy) for the scored sources and "
                        "report ROUGE-1 / 2 / L F1 x100 (needs pip install 'spadeformer[eval]')")
    p.add_argument("--batch-size", type=int, default=None,
                   help="evaluation batch size (default: the run's train.batch_size / "
                        "train.grad_accum; WikiText-103: windows per batch, default 1)")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="data settings over the run's, e.g. data.path=DIR for moved data")

    p = sub.add_parser("generate", help="stream a continuation of a prompt from a trained LM",
                       formatter_class=HelpFormatter,
                       description="Stream bytes after --prompt from a byte-level LM run, or "
                                   "the target for --prompt as the source from a seq2seq run "
                                   "(until its end token). The defaults sample (temperature "
                                   "0.8, nucleus top-p 0.95); --temperature 0 is greedy, "
                                   "--top-p 1 turns the nucleus off.")
    p.add_argument("--run", required=True, help="run directory made by `spadeformer train`")
    p.add_argument("--prompt", required=True, help="text to continue (UTF-8)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely bytes only (default: all)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus: the smallest set of bytes with this much mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="data settings over the run's, e.g. data.root=DIR for moved data")

    from spadeformer.bench.cli import add_bench_parser
    from spadeformer.data.cli import add_data_parser

    add_bench_parser(sub)
    add_data_parser(sub)
    return parser


def _is_rank_zero() -> bool:
    """True outside torchrun, and on rank 0 under it (RANK is set before the group exists)."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    from spadeformer.allocator import reuse_freed_memory
    from spadeformer.models.io import ModelLoadError
    from spadeformer.training.trainer import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        # large CPU tensors are reused instead of page-faulted in every step (allocator.py);
        # SPADEFORMER_MALLOC=system opts out, a bad value is an error like any other
        reuse_freed_memory()
        if args.command == "train":
            metrics = train(args.config, args.overrides, out=args.out, resume=args.resume)
            if _is_rank_zero():  # under torchrun every rank gets here
                print(json.dumps(metrics, indent=2))
        elif args.command == "eval":
            print(json.dumps(evaluate(args.run, args.split, args.max_batches, args.batch_size,
                                      args.rouge, args.overrides),
                             indent=2))
        elif args.command == "generate":
            generate_text(args.run, args.prompt, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed, stream=sys.stdout, echo_prompt=True,
                          data_overrides=args.overrides)
        else:
            return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModelLoadError) as err:
        print(f"spadeformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"spadeformer {args.command}: stopped: {err} (the last good checkpoint is kept)",
              file=sys.stderr)
        return 3
    return 0


def console_main() -> int:
    """The ``spadeformer`` command: :func:`main`, with each warning shown as one line
    (``spadeformer: warning: ...``) rather than Python's file:line and source echo."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"spadeformer: warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
