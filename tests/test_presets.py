"""Every YAML preset under configs/ is loaded, built at full size (on the meta device) and
trained for 2 steps through the CLI on fixture data written here in the release formats.

For speed the runs shrink the width (d_model 16) and scale lengths down (sequence, window,
chunk and evaluation context by the same factor), but keep each preset's structure: system,
depth, which layers are global, causality, dropout and the optimiser settings.
"""

import importlib.util
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import spadeformer.models as models
from spadeformer.cli import evaluate, train
from spadeformer.config import SpadeConfig
from spadeformer.runconfig import build_model_config, load_run_config
from spadeformer.tasks import SOURCES, Task

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.relative_to(ROOT / "configs").as_posix()
                 for p in (ROOT / "configs").rglob("*.yaml"))


def test_the_expected_presets_exist():
    lra = {f"lra/{n}.yaml" for n in ("listops", "text", "retrieval", "image", "pathfinder",
                                     "pathx")}
    lm = {f"lm/wikitext103-{s}.yaml" for s in (
        "spade-s4-window", "spade-s4-chunk", "spade-s5-window", "spade-hyena-window",
        "transformer-full", "transformer-window", "transformer-chunk", "s4")}
    ablations = {f"ablations/global-{k}.yaml" for k in (
        "extractor-s4", "extractor-lstm", "bottom1", "bottom4", "bottom8", "all", "top1")}
    ablations |= {f"ablations/window{w}-seq{s}.yaml" for w in (128, 256, 512)
                  for s in ("2k", "3k", "4k", "6k")}
    seq2seq = {"seq2seq/summarization.yaml", "seq2seq/pretrain-span-corruption.yaml"}
    assert lra | lm | ablations | seq2seq | {"demo.yaml"} == set(CONFIGS)
    readme = (ROOT / "configs" / "README.md").read_text()
    assert "window{128,256,512}-seq{2k,3k,4k,6k}" in readme
    for name in CONFIGS:  # the table documents every preset
        if not name.startswith("ablations/window"):
            assert f"`{name}`" in readme, name


def test_ablation_files_are_what_the_script_writes():
    spec = importlib.util.spec_from_file_location(
        "make_ablation_configs", ROOT / "scripts" / "make_ablation_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files = module.render()
    assert sorted(files) == sorted(c.split("/")[1] for c in CONFIGS if c.startswith("abl"))
    for name, text in files.items():
        assert (ROOT / "configs" / "ablations" / name).read_text() == text, name


# --------------------------------------------------------------------- the paper's settings
# Paper Table 10 (LRA): batch size, learning rate, weight decay, dropout, chunk size; the task
# lengths of Sec. 4.1 (Retrieval: per document).
TABLE10 = {
    "listops": (64, 1.5e-3, 0.0, 0.2, 128, ("max_length", 2000)),
    "text": (100, 1e-2, 1e-2, 0.2, 128, ("max_length", 4096)),
    "retrieval": (128, 4e-3, 3e-2, 0.1, 128, ("max_length", 4000)),
    "image": (100, 1e-2, 2e-2, 0.0, 128, None),
    "pathfinder": (128, 1e-2, 1e-2, 0.0, 128, ("size", 32)),
    "pathx": (16, 1e-2, 1e-2, 0.0, 1024, ("size", 128)),
}


@pytest.mark.parametrize("name", sorted(TABLE10))
def test_lra_presets_hold_table10(name):
    cfg = load_run_config(ROOT / "configs" / "lra" / f"{name}.yaml")
    bs, lr, wd, dropout, chunk, length = TABLE10[name]
    t, m = cfg["train"], cfg["model"]
    assert (t["batch_size"], t["lr"], t["weight_decay"], t["clip_norm"]) == (bs, lr, wd, 1.0)
    assert t["ssm_lr"] == 1e-3  # our choice, after S4's LRA configs
    assert t["schedule"] == "linear" and 0 < t["warmup_steps"] < t["steps"]
    assert (m["preset"], m["size"], m["causal"]) == ("spade-s4-chunk", "lra", False)
    assert (m["dropout"], m["chunk_size"]) == (dropout, chunk)
    if length is not None:
        assert cfg["data"][length[0]] == length[1]
    text = (ROOT / "configs" / "lra" / f"{name}.yaml").read_text()
    assert "model.preset=spade-s4-window" in text and "model.preset=transformer-full" in text
    assert "our choice" in text


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.startswith(("lra/", "lm/", "seq2seq/"))])
def test_every_system_fits_the_lra_lm_and_seq2seq_files(name):
    """configs/README.md: any model.preset works with these files (config level)."""
    from spadeformer.config import SYSTEMS

    cfg = load_run_config(ROOT / "configs" / name)
    for system in SYSTEMS:
        built = build_model_config({**cfg["model"], "preset": system})
        assert built.attention == SpadeConfig.from_preset(system).attention


def _ablation_expectation(name: str) -> dict:
    if m := re.fullmatch(r"window(\d+)-seq(\d)k", name):
        return {"window_size": int(m[1]), "seq_len": {"2": 2048, "3": 3072, "4": 4096,
                                                      "6": 6144}[m[2]]}
    if m := re.fullmatch(r"global-extractor-(s4|lstm)", name):
        return {"ssm": m[1]}
    layers = {"bottom1": [0], "bottom4": [0, 1, 2, 3], "bottom8": list(range(8)),
              "all": list(range(16)), "top1": [15]}
    return {"global_layers": layers[name.removeprefix("global-")]}


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.startswith(("lm/", "ablations/"))])
def test_wikitext_presets_hold_the_paper_setup(name):
    cfg = load_run_config(ROOT / "configs" / name)
    # as `spadeformer train` builds it on the release: 267,735 words + <pad>, <eos>
    full = build_model_config({**cfg["model"], "vocab_size": 267_737})
    assert cfg["data"]["name"] == "wikitext103" and cfg["data"]["context"] == 400
    assert (full.n_layers, full.d_model, full.causal) == (16, 1024, True)
    assert full.adaptive_cutoffs == [20000, 60000]
    stem = Path(name).stem
    if name.startswith("lm/"):
        assert cfg["data"]["seq_len"] == 3072 and full.window_size == 512
        system = stem.removeprefix("wikitext103-")
        assert cfg["model"]["preset"] == system
        if system.startswith("spade-s4"):
            assert full.ssm == "s4" and full.ssm_options["trainable"] is False  # frozen S4
        return
    expected = _ablation_expectation(stem)
    got = {"window_size": full.window_size, "seq_len": cfg["data"]["seq_len"],
           "ssm": full.ssm, "global_layers": full.global_layers}
    assert {k: got[k] for k in expected} == expected
    if "window" in stem:
        assert full.global_layers == [0] and full.ssm == "s4"
    else:
        assert cfg["data"]["seq_len"] == 3072 and full.window_size == 512


# --------------------------------------------------------------------- fixture data
def write_listops(root):
    root.mkdir(parents=True)
    rows = ["( ( ( [MAX 2 ) 9 ) ] )\t9", "( ( ( [SM 1 ) ( ( ( [MIN 4 ) 5 ) ] ) ) ] )\t5",
            "( ( ( ( [MED 1 ) 7 ) 3 ) ] )\t3", "( ( ( [MIN 8 ) 6 ) ] )\t6"]
    for split in ("train", "val", "test"):
        (root / f"basic_{split}.tsv").write_text("Source\tTarget\n" + "\n".join(rows) + "\n")


def write_aclimdb(root):
    for split in ("train", "test"):
        for name in ("neg", "pos"):
            (root / split / name).mkdir(parents=True)
            for i in range(5):
                (root / split / name / f"{i}_1.txt").write_text(f"A {name} film. " * (i + 3))


def write_aan(root):
    root.mkdir(parents=True)
    lines = [f"{i % 2}\tP{i}\tQ{i}\t{b'on parsing ' * (i + 2)!r}\t{b'we cite ' * (i + 5)!r}"
             for i in range(4)]
    for split in ("train", "eval", "test"):
        (root / f"new_aan_pairs.{split}.tsv").write_text("\n".join(lines) + "\n")


def write_cifar(root):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        (root / name).write_bytes(pickle.dumps({b"data": data, b"labels": [k % 10, 3]},
                                               protocol=2))


def write_pathfinder(root, size, n=10):
    from PIL import Image

    rng = np.random.default_rng(size)
    (root / "imgs" / "0").mkdir(parents=True)
    (root / "metadata").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
            root / "imgs" / "0" / f"sample_{i}.png")
    (root / "metadata" / "0.npy").write_text("".join(
        f"imgs/0 sample_{i}.png {i} {i % 2} 1.8 14 5 5 2 3 1\n" for i in range(n)))


WORDS = "the of and in to a was is for on as by with he at from that his it = @-@ <unk>".split()
WIKI_LINES = {"train": 120, "valid": 30, "test": 30}


def write_wikitext(root):
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in WIKI_LINES.items():
        lines = [" ".join(rng.choice(WORDS, int(rng.integers(0, 15)))) for _ in range(n)]
        (root / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n")


def write_seq2seq(root):
    root.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split in ("train", "val", "test"):
        rows = []
        for _ in range(6):
            words = " ".join(rng.choice(WORDS[:12], int(rng.integers(3, 12))))
            rows.append(json.dumps({"source": words, "target": words.split()[0]}))
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        docs = [json.dumps({"text": " ".join(rng.choice(WORDS, 40))}) for _ in range(4)]
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / f"{split}.jsonl").write_text("\n".join(docs) + "\n")


def write_corpus(root):
    root.mkdir(parents=True)
    for i in range(30):  # enough files that the hash split gives val and test some
        body = "".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(15))
        (root / f"m{i:02d}.py").write_text(f"# module {i}\n{body}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one thread is as fast, and it does not stall when other
    processes share the (2-core) machine, as OpenMP's spinning threads do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    write_listops(base / "listops")
    write_aclimdb(base / "aclImdb")
    write_aan(base / "tsv_data")
    write_cifar(base / "cifar-10-batches-py")
    write_pathfinder(base / "pf32", 32)
    write_pathfinder(base / "pf128", 128, n=10)
    write_wikitext(base / "wikitext-103")
    write_corpus(base / "corpus")
    write_seq2seq(base / "seq2seq")
    return base


# --------------------------------------------------------------------- shrinking a preset
COMMON = ["train.steps=2", "train.batch_size=2", "train.grad_accum=1", "train.warmup_steps=0",
          "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
          "train.log_every=1", "train.progress=false", "train.precision=fp32",
          "train.device=cpu", "model.d_model=16", "model.n_heads=2", "model.d_ff=32"]
LM_SCALE = 32  # wikitext lengths: seq 3072 -> 96, window 512 -> 16, context 400 -> 12
LRA_SCALE = 16  # chunk 128 -> 8, Path-X chunk 1024 -> 64


def small_overrides(cfg: dict, data_root: Path) -> list[str]:
    """Overrides that make a preset train in well under a second on a CPU."""
    full = build_model_config(cfg["model"])
    name = cfg["data"]["name"]
    scale = LM_SCALE if name == "wikitext103" else LRA_SCALE
    out = list(COMMON)
    if full.window_size is not None:
        out.append(f"model.window_size={max(2, full.window_size // scale)}")
    if full.chunk_size is not None:
        out.append(f"model.chunk_size={max(2, full.chunk_size // scale)}")
    if "d_state" in full.ssm_options:
        out.append("model.ssm_options.d_state=8")
    if name == "wikitext103":
        out += [f"data.path={data_root / 'wikitext-103'}", "data.vocab_path=null",
                "data.cache_dir=null", f"data.seq_len={cfg['data']['seq_len'] // scale}",
                f"data.context={cfg['data']['context'] // scale}",
                # the fixture's vocabulary is 25 words: bands below it, same structure
                "model.adaptive_cutoffs=[8, 16]"]
    elif name == "stdlib":
        out += [f"data.root={data_root / 'corpus'}", "data.seq_len=32"]
    elif name == "seq2seq":
        out += [f"data.path={data_root / 'seq2seq'}", "data.max_source_length=48",
                "data.max_target_length=16"]
    elif name == "span_corruption":
        out += [f"data.path={data_root / 'seq2seq' / 'docs'}", "data.seq_len=48"]
    else:
        path = {"listops": "listops", "text": "aclImdb", "retrieval": "tsv_data",
                "image": "cifar-10-batches-py",
                "pathfinder": "pf128" if cfg["data"].get("size") == 128 else "pf32"}[name]
        out.append(f"data.path={data_root / path}")
        if "max_length" in cfg["data"]:
            out.append("data.max_length=48")
    return out


def full_size_parameters(cfg: dict) -> int:
    """Parameters of the preset as written, counted on the meta device (no allocation)."""
    section = dict(cfg["model"])
    task = getattr(SOURCES[cfg["data"]["name"]], "task", None)
    if isinstance(task, Task):  # the LRA sources know their vocabulary without data
        section.setdefault("vocab_size", task.vocab_size)
        if task.num_labels is not None:
            section.setdefault("num_labels", task.num_labels)
        cls = task.model_cls()
    else:  # WikiText-103: the size's vocabulary (267,735 words + specials on the release)
        cls = models.SpadeForCausalLM
    with torch.device("meta"):
        model = cls(build_model_config(section))
    return model.num_parameters()


def train_preset(name: str, data_root: Path, out: Path, extra=()) -> tuple[dict, dict]:
    cfg = load_run_config(ROOT / "configs" / name)
    metrics = train(str(ROOT / "configs" / name), [*small_overrides(cfg, data_root), *extra],
                    out=str(out))
    return cfg, metrics


@pytest.mark.parametrize("name", CONFIGS)
def test_preset_builds_at_full_size_and_trains_two_steps(name, data, tmp_path):
    cfg = load_run_config(ROOT / "configs" / name)
    n = full_size_parameters(cfg)
    if name.startswith("lra/"):
        assert 100_000 < n < 2_000_000, n  # paper Sec. 4.1: LRA models under 2M
    elif name.startswith(("lm/", "ablations/")):
        assert 190_000_000 < n < 310_000_000, n  # the ~250M scale of Baevski & Auli
    elif name.startswith("seq2seq/"):
        assert 190_000_000 < n < 230_000_000, n  # T5-base's shape on 258 byte ids

    run = tmp_path / "run"
    cfg, metrics = train_preset(name, data, run)
    assert metrics["step"] == 2 and math.isfinite(metrics["train_loss"])
    assert math.isfinite(metrics["val_loss"])
    resolved = yaml.safe_load((run / "run_config.yaml").read_text())
    model, full = resolved["model"], build_model_config(cfg["model"])
    # the structure of the preset survives the shrinking
    for key in ("n_layers", "global_layers", "ssm", "attention", "causal", "position", "norm",
                "dropout", "tie_embeddings"):
        assert model[key] == getattr(full, key), key
    if full.ssm_options.get("trainable") is not None:
        assert model["ssm_options"]["trainable"] == full.ssm_options["trainable"]
    for key in ("lr", "weight_decay", "clip_norm", "schedule", "betas", "min_lr_ratio"):
        assert resolved["train"][key] == pytest.approx(cfg["train"].get(key, resolved["train"][
            key])), key
    objective = SOURCES[cfg["data"]["name"]]
    if getattr(objective, "task", None) is not None and isinstance(objective.task, Task):
        assert model["vocab_size"] == objective.task.vocab_size
    assert ("val_accuracy" in metrics) == (cfg["data"]["name"] not in (
        "wikitext103", "stdlib", "seq2seq", "span_corruption"))
    saved = SpadeConfig.from_dict(json.loads((run / "model" / "config.json").read_text())["config"])
    assert saved.to_dict() == SpadeConfig.from_dict(model).to_dict()


@pytest.mark.parametrize("name, extra", [
    ("lra/listops.yaml", []),  # the README's MEGA-chunk line
    # configs/README: Mega's image and text settings
    ("lra/image.yaml", ["model.mega_attention_fn=laplace", "model.mega_norm=batchnorm"]),
    ("lra/text.yaml", ["model.mega_norm=scalenorm", "model.norm=post"]),
    # and its WikiText-103 model's rotary bias (on a file with adaptive input and softmax)
    ("lm/wikitext103-spade-s4-window.yaml", ["model.position=rotary"]),
])
def test_mega_chunk_trains_on_a_preset_file(data, tmp_path, name, extra):
    """An LRA / LM file with model.preset=mega-chunk, two steps."""
    overrides = [o for o in small_overrides(load_run_config(ROOT / "configs" / name), data)
                 if "ssm_options.d_state" not in o]  # S4's option: the EMA has n_dims
    metrics = train(str(ROOT / "configs" / name),
                    [*overrides, "model.preset=mega-chunk", *extra], out=str(tmp_path / "run"))
    assert metrics["step"] == 2 and math.isfinite(metrics["val_loss"])
    resolved = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())["model"]
    causal = name.startswith("lm/")  # LRA classifies whole sequences
    assert (resolved["block"], resolved["ssm"], resolved["causal"]) == ("mega", "ema", causal)
    for option in extra:  # the override reached the saved model config
        key, value = option.removeprefix("model.").split("=")
        assert resolved[key] == value


# --------------------------------------------------------------------- eval on trained runs
def test_eval_reports_accuracy_for_lra_and_perplexity_for_wikitext(data, tmp_path):
    train_preset("lra/retrieval.yaml", data, tmp_path / "retrieval")
    out = evaluate(str(tmp_path / "retrieval"), "test")
    assert out["split"] == "test" and 0.0 <= out["accuracy"] <= 1.0
    assert out["majority_accuracy"] == 0.5 and out["chance_accuracy"] == 0.5  # labels 0,1,0,1
    # the same loss as the saved model on padded, masked batches of the whole test split
    from spadeformer.data.lra_common import PadCollate
    from spadeformer.data.retrieval import AANDataset

    model = models.SpadeForRetrieval.from_pretrained(tmp_path / "retrieval" / "model").eval()
    test = AANDataset(data / "tsv_data", "test", max_length=48)
    with torch.no_grad():
        loss = model(**PadCollate()([test[i] for i in range(len(test))])).loss
    assert out["loss"] == pytest.approx(float(loss), rel=1e-5)

    run = tmp_path / "wiki"
    cfg, _ = train_preset("lm/wikitext103-spade-s4-window.yaml", data, run)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in logged:  # words, not bytes: the live metric is perplexity too
        assert "bpb" not in row and row["ppl"] == pytest.approx(math.exp(row["loss"]))
    full = evaluate(str(run), "test")
    lines = (data / "wikitext-103" / "wiki.test.tokens").read_text().splitlines()
    n_tokens = sum(len(line.split()) + 1 for line in lines)  # words + <eos> per line
    assert full["tokens"] == n_tokens  # every test token scored exactly once
    assert full["seq_len"] == 3072 // LM_SCALE and full["context"] == 400 // LM_SCALE
    assert full["ppl"] == pytest.approx(math.exp(full["loss"]))
    assert 1.0 < full["ppl"] < 1e4 and full["unigram_ppl"] > 1.0
    assert "bpb" not in full  # word-level: perplexity, not bits per byte
    quick = evaluate(str(run), "test", max_batches=1, batch_size=1)
    assert quick["tokens"] == full["seq_len"]  # the first window scores all its targets

    # the CLI prints the same JSON
    from spadeformer.cli import main

    assert main(["eval", "--run", str(run), "--split", "val", "--max-batches", "1"]) == 0


def test_train_passes_the_sources_collate_fn(data, tmp_path, monkeypatch):
    import spadeformer.training.trainer as trainer_module
    from spadeformer.data.lra_common import PadCollate

    seen = []

    class Spy(trainer_module.Trainer):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("collate_fn"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "Trainer", Spy)
    train_preset("lra/listops.yaml", data, tmp_path / "a")
    train_preset("lm/wikitext103-transformer-chunk.yaml", data, tmp_path / "b")
    assert isinstance(seen[0], PadCollate) and seen[1] is None


def test_cli_eval_prints_ppl(data, tmp_path, capsys):
    run = tmp_path / "wiki"
    train_preset("lm/wikitext103-transformer-window.yaml", data, run)
    capsys.readouterr()
    from spadeformer.cli import main

    assert main(["eval", "--run", str(run), "--split", "val", "--max-batches", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "val" and printed["tokens"] == 96 + (96 - 12)
    assert printed["ppl"] == pytest.approx(math.exp(printed["loss"]))
    assert main(["generate", "--run", str(run), "--prompt", "the"]) == 2
    assert "word ids" in capsys.readouterr().err


def test_adaptive_cutoffs_beyond_the_data_vocabulary_say_what_to_set(data, tmp_path):
    cfg = load_run_config(ROOT / "configs" / "lm" / "wikitext103-spade-s4-window.yaml")
    overrides = [o for o in small_overrides(cfg, data) if not o.startswith("model.adaptive")]
    with pytest.raises(ValueError, match=r"set model.adaptive_cutoffs .* or to null"):
        train(str(ROOT / "configs" / "lm" / "wikitext103-spade-s4-window.yaml"), overrides,
              out=str(tmp_path / "r"))
