import json
import os
import random

import numpy as np
import pytest
import safetensors.torch
import torch
from tiny_models import TinyLM

from spadeformer.training import checkpoint as ck
from spadeformer.training.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
    save_model_weights,
)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_weights_round_trip_and_stay_tied(tmp_path):
    model = TinyLM()
    path = tmp_path / "w.safetensors"
    save_model_weights(model, path)
    with safetensors.safe_open(str(path), "pt") as f:
        stored = set(f.keys())
        aliases = json.loads(f.metadata()["aliases"])
    assert aliases == {"head.weight": "embed.weight"}  # stored once
    assert "head.weight" not in stored and "embed.weight" in stored
    other = TinyLM()
    assert not _same(_params(model), _params(other))
    load_model_weights(other, path)
    assert _same(_params(model), _params(other))
    assert other.head.weight is other.embed.weight


def test_partly_overlapping_tensors_are_saved_as_copies(tmp_path):
    class Views(torch.nn.Module):
        def __init__(self):
            super().__init__()
            base = torch.arange(12.0)
            self.register_buffer("whole", base)
            self.register_buffer("part", base[2:6])  # shares storage, not an alias

    m = Views()
    save_model_weights(m, tmp_path / "v.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "v.safetensors")
    assert torch.equal(loaded["part"], torch.arange(2.0, 6.0))
    assert torch.equal(loaded["whole"], torch.arange(12.0))


def test_rng_round_trip_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    want = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


def _state(step):
    return {"optimizer": {"lr": 0.1 * step}, "data": {"position": 10 * step},
            "rng": [capture_rng_state()]}


def test_manager_save_load_pointers_and_garbage_collection(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck")
    model = TinyLM()
    first = _params(model)
    mgr.save(model, _state(5), 5, tags=("last", "best"), info={"val_loss": 1.5})
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    mgr.save(model, _state(10), 10, tags=("last",))
    assert mgr.pointer("best") == {"step": 5, "dir": "step-00000005", "val_loss": 1.5}
    assert mgr.pointer("last")["step"] == 10
    fresh = TinyLM()
    state = mgr.load(fresh, tag="best")
    assert state["step"] == 5 and state["data"]["position"] == 50
    assert _same(_params(fresh), first)
    assert load_checkpoint(tmp_path / "ck", fresh)["step"] == 10  # root -> last
    # A third save moves best too: step 5 is no longer named, so it is deleted.
    mgr.save(model, _state(15), 15, tags=("last", "best"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.is_dir()) == ["step-00000015"]
    with pytest.raises(ValueError, match="tag"):
        mgr.save(model, _state(1), 1, tags=("../evil",))
    for tags in ((), "last"):  # no pointer (the cleanup would delete it), or a bare string
        with pytest.raises(ValueError, match="tags must be a non-empty sequence"):
            mgr.save(model, _state(20), 20, tags=tags)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.is_dir()) == ["step-00000015"]


def test_state_is_read_with_weights_only(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(TinyLM(), _state(1), 1)
    path = mgr.path("last") / STATE_FILE

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": 1, "payload": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        mgr.load(TinyLM())


def _saved_at_step_3_then_changed(tmp_path):
    """A manager holding step 3, the model changed since, and the step-3 weights (`good`)."""
    mgr = CheckpointManager(tmp_path / "ck")
    model = TinyLM()
    good = _params(model)
    mgr.save(model, _state(3), 3)
    with torch.no_grad():
        model.embed.weight.mul_(-1)
    return mgr, model, good


def test_crash_while_writing_weights_keeps_previous_checkpoint(tmp_path, monkeypatch):
    mgr, model, good = _saved_at_step_3_then_changed(tmp_path)

    real = safetensors.torch.save_file

    def half_then_die(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as f:
            f.truncate(size // 2)  # the bytes a kill mid-write would leave
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(model, _state(6), 6)
    monkeypatch.undo()
    restored = TinyLM()
    state = mgr.load(restored)
    assert state["step"] == 3 and _same(_params(restored), good)
    # The next good save cleans the half-written leftovers.
    mgr.save(model, _state(9), 9)
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.is_dir()] == ["step-00000009"]


def test_crash_while_writing_state_or_pointer_keeps_previous_checkpoint(tmp_path, monkeypatch):
    mgr, model, good = _saved_at_step_3_then_changed(tmp_path)

    real_save = torch.save

    def torch_save_half(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_half)
    with pytest.raises(RuntimeError, match="disk full"):
        mgr.save(model, _state(6), 6)
    monkeypatch.undo()
    # Crash between the new directory landing and the pointer flip: os.replace never happens.
    real_write = ck.atomic_write

    def die_in_pointer(path, write):
        def partial(tmp):
            write(tmp)
            with open(tmp, "r+b") as fh:
                fh.truncate(3)
            raise KeyboardInterrupt("killed before os.replace")
        real_write(path, partial)

    monkeypatch.setattr(ck, "atomic_write", die_in_pointer)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(model, _state(7), 7)
    monkeypatch.undo()
    assert mgr.pointer("last")["step"] == 3
    assert not list((tmp_path / "ck").glob(".*.tmp-*"))  # temp pointer removed
    restored = TinyLM()
    assert mgr.load(restored)["step"] == 3 and _same(_params(restored), good)


def test_mismatched_weights_and_state_are_detected(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(TinyLM(), _state(2), 2)
    mgr.save(TinyLM(), _state(4), 4, tags=("other",))
    # Splice step 4's weights into step 2's directory.
    d2, d4 = mgr.path("last"), mgr.path("other")
    (d2 / MODEL_FILE).write_bytes((d4 / MODEL_FILE).read_bytes())
    with pytest.raises(RuntimeError, match="inconsistent"):
        mgr.load(TinyLM())
    with pytest.raises(FileNotFoundError, match="best"):
        mgr.load(TinyLM(), tag="best")
