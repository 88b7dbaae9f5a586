"""The `spadeformer` command end to end on a tiny generated corpus."""

import json

import pytest
import torch

from spadeformer.cli import main

TINY = [
    "model.preset=spade-s4-window", "model.size=tiny", "model.d_model=32", "model.n_layers=2",
    "model.n_heads=2", "model.d_ff=64", "model.window_size=8", "model.dropout=0.0",
    "model.ssm_options.trainable=false",
    "data.seq_len=32",
    "train.steps=20", "train.batch_size=4", "train.lr=3e-3", "train.eval_every=10",
    "train.eval_batches=2", "train.log_every=5", "train.save_every=10", "train.progress=false",
]


@pytest.fixture
def corpus_root(tmp_path):
    root = tmp_path / "src"
    for i in range(30):
        (root / f"m{i:02d}.py").parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{j}(x):\n    return x + {j}\n" for j in range(20))
        (root / f"m{i:02d}.py").write_text(f"# module {i}\n{body}")
    return root


@pytest.mark.parametrize(
    "argv",
    [[], ["train"], ["eval"], ["generate"], ["bench"], ["bench", "train"],
     ["bench", "generate"], ["data"], ["data", "listops"], ["data", "pathfinder"]],
)
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: spadeformer" in text
    # every shown default is something the option accepts as typed: no list reprs, no "None"
    assert "(default: [" not in text and "None" not in text


def test_unknown_key_names_the_closest(capsys, tmp_path):
    code = main(["train", "--out", str(tmp_path / "r"), "train.lrr=1e-3"])
    assert code == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    code = main(["train", "--out", str(tmp_path / "r"), "model.windw_size=3"])
    assert code == 2
    assert "did you mean 'window_size'" in capsys.readouterr().err


def test_train_eval_generate(tmp_path, corpus_root, capsys):
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), f"data.root={corpus_root}", *TINY])
    assert code == 0
    final = json.loads(capsys.readouterr().out)
    assert final["step"] == 20
    for name in ("run_config.yaml", "metrics.jsonl", "model/config.json",
                 "model/model.safetensors", "checkpoints/last.json"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"step", "split", "loss", "bpb", "tokens_per_s", "lr"} <= set(train[0])
    assert train[-1]["loss"] < train[0]["loss"]  # it learns

    assert main(["eval", "--run", str(run), "--split", "test"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "test" and metrics["bpb"] > 0 and metrics["unigram_bpb"] > 0

    assert main(["generate", "--run", str(run), "--prompt", "def f", "--max-new-tokens", "15",
                 "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f") and len(text.encode()) >= len("def f") + 1


def test_resume_refuses_and_continues(tmp_path, corpus_root, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), f"data.root={corpus_root}", *TINY]
    assert main([*args, "train.steps=10"]) == 0
    assert "no --config: the built-in defaults, data.name='stdlib' with train.steps=10" in (
        capsys.readouterr().err)
    assert main(args) == 2  # a second fresh start into the same run dir is refused
    assert "resume" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"changed settings \['steps'\]"):
        assert main([*args, "--resume"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 20
    assert f"resuming {run} at step 10 of train.steps=20" in captured.err
    assert main(["train", "--resume", *TINY]) == 2
    assert "--resume continues the run in --out DIR: pass --out" in capsys.readouterr().err


def test_relative_data_paths_are_saved_absolute(tmp_path, corpus_root, capsys, monkeypatch):
    """eval and resume read the run's saved data paths from any working directory."""
    import yaml

    monkeypatch.chdir(corpus_root.parent)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), f"data.root={corpus_root.name}", *TINY,
                 "train.steps=2"]) == 0
    saved = yaml.safe_load((run / "run_config.yaml").read_text())["data"]
    assert saved["root"] == str(corpus_root)
    monkeypatch.chdir(tmp_path.parent)
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", "val", "--max-batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "val"
    # data moved since: eval takes data.* overrides (and nothing else)
    from spadeformer.cli import _load_run

    moved = corpus_root.rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    cfg, source, _ = _load_run(str(run), ["data.root=moved"])  # relative to the cwd
    assert cfg["data"]["root"] == str(moved) and source.corpus.root == moved
    assert main(["eval", "--run", str(run), "--split", "val", "--max-batches", "1",
                 "data.root=moved"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "val"
    assert main(["eval", "--run", str(run), "model.d_model=64"]) == 2
    assert "only data.* settings may change" in capsys.readouterr().err
    assert main(["generate", "--run", str(run), "--prompt", "def", "--max-new-tokens", "3",
                 "data.root=moved"]) == 0  # generate opens the run's data source too
    assert capsys.readouterr().out.startswith("def")
    assert main(["eval", "--run", str(run), "data.rooot=moved"]) == 2
    assert "did you mean 'root'" in capsys.readouterr().err  # misspelled: named, not ignored
    assert main(["eval", "--run", str(run), "data.name=listops"]) == 2
    assert "eval cannot change it" in capsys.readouterr().err


def test_resuming_a_run_saved_with_relative_paths_sees_no_change(tmp_path, corpus_root,
                                                                 monkeypatch, recwarn):
    """Runs saved before paths were made absolute: a plain --resume warns of nothing."""
    monkeypatch.chdir(corpus_root.parent)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), f"data.root={corpus_root}", *TINY,
                 "train.steps=2"]) == 0
    saved = run / "run_config.yaml"
    saved.write_text(saved.read_text().replace(str(corpus_root), corpus_root.name))
    assert main(["train", "--out", str(run), "--resume", "train.steps=3"]) == 0
    said = [str(w.message) for w in recwarn]
    assert any("changed settings ['steps']" in m for m in said)
    assert not any("data" in m for m in said), said


def test_version_and_one_line_warnings(capsys, monkeypatch):
    import warnings

    from spadeformer import __version__
    from spadeformer.cli import console_main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"spadeformer {__version__}"
    with warnings.catch_warnings():  # puts warnings.showwarning back afterwards
        monkeypatch.setattr("sys.argv", ["spadeformer", "--version"])
        with pytest.raises(SystemExit):
            console_main()
        warnings.simplefilter("always")
        warnings.warn("resuming with changed settings", stacklevel=1)
    assert capsys.readouterr().err == "spadeformer: warning: resuming with changed settings\n"


def _metrics_without_timing(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_same_command_same_run(tmp_path, corpus_root, capsys):
    # train.seed fixes the initial weights too, not only dropout and the data order
    for name in ("a", "b"):
        assert main(["train", "--out", str(tmp_path / name), f"data.root={corpus_root}", *TINY,
                     "train.steps=3", "train.log_every=1", "model.dropout=0.1"]) == 0
    assert _metrics_without_timing(tmp_path / "a") == _metrics_without_timing(tmp_path / "b")
    assert main(["train", "--out", str(tmp_path / "c"), f"data.root={corpus_root}", *TINY,
                 "train.steps=3", "train.log_every=1", "model.dropout=0.1", "train.seed=1"]) == 0
    assert _metrics_without_timing(tmp_path / "c") != _metrics_without_timing(tmp_path / "a")


def test_run_config_yaml_repeats_the_run(tmp_path, corpus_root, capsys):
    assert main(["train", "--out", str(tmp_path / "a"), f"data.root={corpus_root}", *TINY,
                 "train.steps=3", "train.log_every=1"]) == 0
    text = (tmp_path / "a" / "run_config.yaml").read_text()
    assert text.startswith("# task: stdlib\n")
    assert main(["train", "--out", str(tmp_path / "b"), "--config",
                 str(tmp_path / "a" / "run_config.yaml")]) == 0
    assert _metrics_without_timing(tmp_path / "b") == _metrics_without_timing(tmp_path / "a")


def test_settings_that_contradict_the_data_are_refused(tmp_path, corpus_root, capsys):
    base = ["train", "--out", str(tmp_path / "r"), f"data.root={corpus_root}", *TINY,
            "train.steps=2"]
    assert main([*base, "train.task=classify"]) == 2
    assert "train.task='classify' contradicts the data" in capsys.readouterr().err
    assert main([*base, "train.lm_metric=ppl"]) == 2
    assert "needs train.lm_metric='bpb'" in capsys.readouterr().err
    # learned positions shorter than the validation blocks: refused before any training
    assert main([*base, "model.position=learned", "model.max_position=32",
                 "data.eval_seq_len=64"]) == 2
    err = capsys.readouterr().err
    assert "data.eval_seq_len=64 is longer than model.max_position=32" in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_full_attention_mega_refuses_data_longer_than_its_bias(tmp_path, corpus_root, capsys):
    tiny = [a for a in TINY if not a.startswith(("model.preset=", "model.ssm_options."))]
    out = tmp_path / "mega"
    assert main(["train", "--out", str(out), f"data.root={corpus_root}", *tiny,
                 "model.preset=mega", "model.max_position=16"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len=32 is longer than model.max_position=16 (the relative bias" in err
    assert not (out / "checkpoints").exists()


def test_eval_refuses_batch_counts_that_score_nothing(tmp_path, corpus_root, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), f"data.root={corpus_root}", *TINY,
                 "train.steps=1", "train.eval_every=1", "train.save_every=1"]) == 0
    capsys.readouterr()
    for flag, value in (("--max-batches", "0"), ("--max-batches", "-3"), ("--batch-size", "0")):
        assert main(["eval", "--run", str(run), flag, value]) == 2
        assert "must be a positive integer" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--rouge"]) == 2  # a byte LM generates no targets
    assert "not a seq2seq task" in capsys.readouterr().err


def test_resume_keeps_the_runs_settings(tmp_path, corpus_root, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), f"data.root={corpus_root}", *TINY, "train.steps=10"]
    assert main(args) == 0
    saved = (run / "run_config.yaml").read_text()
    # a refused fresh start (and a refused resume) leave the run's config alone; the model
    # cannot change on resume (the data may, with a warning)
    assert main([*args, "model.window_size=4"]) == 2
    assert main(["train", "--resume", *args[1:], "model.window_size=4"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (step 10): add --resume" in err
    assert "changes model.window_size (8 -> 4)" in err and "drop the model.* overrides" in err
    assert (run / "run_config.yaml").read_text() == saved
    # without --config the run's own settings are the start; train.* (and data.*) may change
    with pytest.warns(UserWarning) as record:
        assert main(["train", "--out", str(run), "--resume", "train.steps=12",
                     "data.include_tests=false"]) == 0
    said = " | ".join(str(w.message) for w in record)
    assert "changed data settings ['data.include_tests" in said
    assert "changed settings ['steps']" in said
    assert json.loads(capsys.readouterr().out)["step"] == 12
    assert "window_size: 8" in (run / "run_config.yaml").read_text()


def test_run_dir_errors_speak_the_command_line(tmp_path, corpus_root, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds no run to resume (no checkpoint); drop --resume" in err
    assert "model:" not in err  # refused before a model is built
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, "train.steps=2",
                 "train.warmup_steps=5"]) == 2
    assert "in the train section (train.*): warmup_steps" in capsys.readouterr().err
    run = tmp_path / "done"
    assert main(["train", "--out", str(run), f"data.root={corpus_root}", *TINY,
                 "train.steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "already at step 2 of train.steps=2: nothing to train" in capsys.readouterr().err


@pytest.mark.parametrize("override, match", [
    ("data.seq_len=abc", "data.seq_len must be an integer >= 1, got 'abc'"),
    ("data.eval_seq_len=0", "data.eval_seq_len must be an integer >= 1, got 0"),
    ("data.include_tests=maybe", "data.include_tests must be true or false, got 'maybe'"),
    ("data.root=2024", "data.root must be a folder path, got 2024"),
    ("data.max_bytes=0", "data.max_bytes must be an integer >= 1"),
])
def test_data_options_are_checked_by_name(tmp_path, capsys, override, match):
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, override]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r" / "run_config.yaml").exists()


def test_empty_sections_and_integral_floats(tmp_path):
    from spadeformer.runconfig import load_run_config
    from spadeformer.training.trainer import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("data:\nmodel:\n  preset: s4\n")
    cfg = load_run_config(path, ["train.steps=1e3", "data.root='2024'"])
    assert cfg["data"] == {"name": "stdlib", "root": "2024"}  # quoted: a name, not a number
    assert TrainConfig.from_dict(cfg["train"]).steps == 1000
    path.write_text("data:\n  root: '1e5'\ntrain:\n  lr: 1e-3\n")
    cfg = load_run_config(path, ["data.max_bytes=2e5"])
    assert cfg["data"]["root"] == "1e5" and cfg["train"]["lr"] == 0.001
    assert cfg["data"]["max_bytes"] == 200000.0


def test_yaml_exponents_without_dot_are_numbers(tmp_path):
    from spadeformer.runconfig import load_run_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-3\nmodel:\n  preset: s4\n")
    cfg = load_run_config(path, ["train.weight_decay=1e-2", "model.chunk_size=null"])
    assert cfg["train"]["lr"] == 0.003 and cfg["train"]["weight_decay"] == 0.01
    assert cfg["model"]["chunk_size"] is None and cfg["model"]["preset"] == "s4"


def test_same_command_under_torchrun_two_processes(tmp_path, corpus_root):
    """`torchrun --nproc_per_node 2 -m spadeformer.cli train ...` trains with DDP (gloo) and
    only rank 0 writes: every (step, split) appears once in metrics.jsonl."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    steps = [a for a in TINY if not a.startswith(("train.steps=", "train.eval_every=",
                                                 "train.save_every=", "train.log_every="))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "spadeformer.cli", "train", "--out", str(run), f"data.root={corpus_root}",
           *steps, "train.steps=4", "train.warmup_steps=1", "train.eval_every=2",
           "train.save_every=2", "train.log_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["step"] == 4  # printed once
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)) and (4, "train") in keys and (4, "val") in keys
    for name in ("model/model.safetensors", "checkpoints/last.json", "run_config.yaml"):
        assert (run / name).is_file(), name


def test_generate_checks_sampling_arguments_before_echoing_the_prompt(tmp_path):
    import io

    from spadeformer.cli import generate_text

    out = io.StringIO()
    with pytest.raises(ValueError, match="top_p must be None or a number in"):
        generate_text(str(tmp_path / "no-run"), "hello", top_p=0.0, stream=out, echo_prompt=True)
    assert out.getvalue() == ""


def test_generate_checks_learned_positions_before_echoing_the_prompt(tmp_path, corpus_root):
    import io

    from spadeformer.cli import generate_text

    run = tmp_path / "learned"
    assert main(["train", "--out", str(run), f"data.root={corpus_root}", *TINY,
                 "model.position=learned", "model.max_position=32", "train.steps=1",
                 "train.eval_every=1", "train.save_every=1"]) == 0
    out = io.StringIO()
    with pytest.raises(ValueError, match="needs 39 decoding steps.*at most 32"):
        generate_text(str(run), "0123456789", max_new_tokens=30, stream=out, echo_prompt=True)
    assert out.getvalue() == ""
    assert generate_text(str(run), "0123456789", max_new_tokens=23, temperature=0)  # 32 steps


def test_init_from_starts_a_fresh_run_from_saved_weights(tmp_path, corpus_root, capsys):
    from spadeformer.models import SpadeForCausalLM

    base = ["train", f"data.root={corpus_root}", *TINY, "train.steps=4", "train.eval_every=4",
            "train.save_every=4"]
    assert main([*base[:1], "--out", str(tmp_path / "a"), *base[1:]]) == 0
    # lr ~0: the fine-tuned run's weights stay the saved ones, so equality shows the start
    assert main([*base[:1], "--out", str(tmp_path / "b"), *base[1:], "train.lr=1e-12",
                 "train.warmup_steps=0", f"model.init_from={tmp_path / 'a'}"]) == 0
    assert "init_from" in capsys.readouterr().err
    a = SpadeForCausalLM.from_pretrained(tmp_path / "a" / "model").state_dict()
    b = SpadeForCausalLM.from_pretrained(tmp_path / "b" / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert "init_from:" in (tmp_path / "b" / "run_config.yaml").read_text()
    # a plain --resume of the fine-tuned run: init_from is a record there, not a setting
    with pytest.warns(UserWarning, match=r"changed settings \['steps'\]"):
        assert main(["train", "--out", str(tmp_path / "b"), "--resume", "train.steps=6"]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume",
                 f"model.init_from={tmp_path / 'a'}"]) == 2
    assert "drop model.init_from" in capsys.readouterr().err
    assert main([*base[:1], "--out", str(tmp_path / "c"), *base[1:],
                 f"model.init_from={tmp_path / 'nothing'}"]) == 2
    assert "holds no saved model" in capsys.readouterr().err


@pytest.mark.slow
def test_train_compile_runs_spade_and_mega(tmp_path, corpus_root):
    """train.compile=true with the S4 and EMA kernels (complex numbers, FFTs) and the blocked
    attention: a real torch.compile on the CPU, minutes cold."""
    for preset in ("spade-s4-window", "mega-chunk"):
        extra = ["model.ssm_options=null"] if preset == "mega-chunk" else []
        assert main(["train", "--out", str(tmp_path / preset), f"data.root={corpus_root}",
                     *TINY, f"model.preset={preset}", *extra, "train.steps=3",
                     "train.compile=true"]) == 0
