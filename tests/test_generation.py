import pytest
import torch

from spadeformer.config import SpadeConfig
from spadeformer.generation import filter_logits, generate
from spadeformer.models import SpadeForCausalLM


def tiny_lm(system="spade-s4-window", **kw):
    cfg = SpadeConfig.from_preset(system, size="tiny", vocab_size=50, d_model=32, n_heads=4,
                                  d_ff=64, window_size=16, chunk_size=16, **kw)
    return SpadeForCausalLM(cfg).eval()


def state_numel(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel()
    if isinstance(state, dict):
        return sum(state_numel(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_numel(v) for v in state)
    if hasattr(state, "__dict__"):
        return sum(state_numel(v) for v in vars(state).values())
    return 0


@pytest.mark.parametrize(
    "system, tokens, ssm",
    [("spade-s4-window", 2000, "s4"), ("spade-s4-chunk", 500, "s4"),
     ("spade-s4-window", 300, "s4d"), ("spade-s4-window", 300, "s5"),
     ("spade-s4-window", 300, "lstm")],
)
def test_state_size_is_constant_while_generating(system, tokens, ssm):
    """SSM state + window (or chunk) cache: the same number of elements at every step."""
    model = tiny_lm(system, ssm=ssm)
    state = model.initial_state(1)
    sizes = {}
    token = torch.tensor([3])
    with torch.no_grad():
        for t in range(1, tokens + 1):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
            if t in (20, tokens // 2, tokens):
                sizes[t] = state_numel(state)
    assert sizes[20] > 0
    assert len(set(sizes.values())) == 1, sizes


def test_hyena_state_grows_with_the_tokens():
    # Hyena's implicit filter has no recurrent form: its state keeps the input history
    model = tiny_lm(ssm="hyena")
    state = model.initial_state(1)
    with torch.no_grad():
        sizes = []
        for _ in range(3):
            _, state = model.step(torch.tensor([1]), state)
            sizes.append(state_numel(state))
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("system", ["spade-s4-window", "transformer-full", "spade-s4-chunk"])
def test_stepping_twice_from_a_copied_state(system):
    # step() consumes its state (caches are written in place); a deep copy branches safely
    import copy

    model = tiny_lm(system)
    prompt, a, b = torch.randint(0, 50, (1, 6)), torch.tensor([7]), torch.tensor([9])
    with torch.no_grad():
        state = model.initial_state(1)
        for t in range(6):
            _, state = model.step(prompt[:, t], state)
        logits_b, _ = model.step(b, copy.deepcopy(state))
        logits_a, state_a = model.step(a, state)
        logits_a2, _ = model.step(b, state_a)
        full_a = model(torch.cat([prompt, a[None], b[None]], 1)).logits
        full_b = model(torch.cat([prompt, b[None]], 1)).logits
    torch.testing.assert_close(logits_b, full_b[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_a, full_a[:, -2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_a2, full_a[:, -1], rtol=1e-4, atol=1e-4)


def test_full_attention_cache_grows():
    model = tiny_lm("transformer-full")
    state = model.initial_state(1)
    with torch.no_grad():
        _, state = model.step(torch.tensor([1]), state)
        first = state_numel(state)
        for _ in range(30):
            _, state = model.step(torch.tensor([1]), state)
    assert state_numel(state) > first


@pytest.mark.parametrize("system", ["spade-s4-window", "transformer-window", "s4"])
def test_greedy_equals_argmax_of_full_forward(system):
    model = tiny_lm(system)
    prompt = torch.randint(0, 50, (2, 5))
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_sampling_is_seeded_and_streams():
    model = tiny_lm()
    prompt = torch.randint(0, 50, (1, 4))
    seen = []
    a = generate(model, prompt, 20, temperature=1.0, top_k=10, top_p=0.9, seed=7,
                 on_token=lambda ids: seen.append(int(ids[0])))
    b = generate(model, prompt, 20, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    assert torch.equal(a, b)
    assert seen == a[0, 4:].tolist()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept_k.tolist() == [[True, True, False, False]]
    kept_p = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept_p.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept_small = torch.isfinite(filter_logits(logits, top_p=0.1))
    assert kept_small.tolist() == [[True, False, False, False]]  # the top token always stays


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"seed": "x"}, r"seed must be None or an integer in \[-2\*\*63, 2\*\*64\), got 'x'"),
        ({"seed": 2**64}, "seed must be None or an integer"),
        ({"seed": True}, "seed must be None or an integer"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = tiny_lm()
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[1, 2]]), **args)


def test_bidirectional_model_cannot_stream():
    cfg = SpadeConfig.from_preset("spade-s4-window", size="tiny", causal=False)
    from spadeformer.models import SpadeModel

    with pytest.raises(RuntimeError, match="causal"):
        SpadeModel(cfg).initial_state(1)


def test_generate_steps_each_token_but_the_last():
    model = tiny_lm()
    calls = []
    real_step = model.step

    def counting_step(ids, state):
        calls.append(int(ids[0]))
        return real_step(ids, state)

    model.step = counting_step
    out = generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0)
    assert out.shape == (1, 7)
    assert calls == out[0, :6].tolist()  # the prompt and the first three new tokens


def test_learned_positions_fill_max_position_and_refuse_beyond_up_front():
    model = tiny_lm("transformer-window", position="learned", max_position=8)
    out = model.generate(torch.tensor([[1, 2, 3]]), 6, temperature=0)  # 8 steps, 9 tokens
    assert out.shape == (1, 9)
    streamed = []
    with pytest.raises(ValueError, match="needs 9 decoding steps.*at most 8"):
        model.generate(torch.tensor([[1, 2, 3]]), 7, temperature=0,
                       on_token=lambda t: streamed.append(t))
    assert streamed == []  # refused before the first token


def test_sampling_helpers_check_their_arguments():
    from spadeformer.generation import sample_next

    logits = torch.randn(2, 10)
    for kwargs, message in [({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
                            ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(ValueError, match=message):
            sample_next(logits, **kwargs)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    np = pytest.importorskip("numpy")
    assert filter_logits(logits, top_k=np.int64(3)).isfinite().sum(-1).tolist() == [3, 3]
    out = generate(tiny_lm(), torch.tensor([[1, 2]]), np.int64(2), top_k=np.int32(5), seed=0)
    assert out.shape == (1, 4)
    # numpy floats are numbers too (a value read from an array or a config)
    out = generate(tiny_lm(), torch.tensor([[1, 2]]), 2, temperature=np.float32(0.7),
                   top_p=np.float32(0.9), seed=0)
    assert out.shape == (1, 4)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=True)


def test_a_tiny_temperature_samples_the_argmax():
    from spadeformer.generation import sample_next

    logits = torch.randn(3, 10)
    ids = sample_next(logits, temperature=1e-39, generator=torch.Generator().manual_seed(0))
    assert ids.tolist() == logits.argmax(-1).tolist()


def test_eos_token_stops_each_row_and_then_the_loop():
    model = tiny_lm()
    prompt = torch.tensor([[1, 2], [3, 4]])
    free = generate(model, prompt, 8, temperature=0)  # greedy: the rows' own continuations
    eos = int(free[0, 4])  # row 0's third new token
    k = free[0, 2:].tolist().index(eos)  # its first occurrence
    alone = generate(model, prompt[:1], 8, temperature=0, eos_token_id=eos)
    assert alone.tolist() == free[:1, : 2 + k + 1].tolist()  # stopped right after it
    both = generate(model, prompt, 8, temperature=0, eos_token_id=eos)
    assert both[0, : 2 + k + 1].tolist() == free[0, : 2 + k + 1].tolist()
    assert set(both[0, 2 + k + 1 :].tolist()) <= {eos}  # a finished row repeats the end
    row1 = free[1, 2:].tolist()
    stop1 = row1.index(eos) + 1 if eos in row1 else len(row1)
    assert both[1, 2 : 2 + stop1].tolist() == row1[:stop1]
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, prompt, 2, eos_token_id=-1)
    with pytest.raises(ValueError, match="not an id of this model's vocabulary"):
        generate(model, prompt, 2, eos_token_id=10_000)


def test_full_attention_mega_decodes_up_to_its_bias_reach_only():
    model = tiny_lm("mega", max_position=8)
    assert model.max_steps == 8
    assert model.generate(torch.tensor([[1, 2, 3]]), 6, temperature=0).shape == (1, 9)
    with pytest.raises(ValueError, match="needs 9 decoding steps.*at most 8"):
        model.generate(torch.tensor([[1, 2, 3]]), 7, temperature=0)
    assert tiny_lm("mega-chunk", max_position=8).max_steps is None  # chunks never reach it
