"""FrozenCache: when a value computed from parameters may be served again."""

import copy
import pickle

import torch

from spadeformer.ssm.base import FrozenCache


def counting(cache, params):
    calls = []

    def compute():
        calls.append(1)
        return sum(p.sum() for p in params)

    return lambda what=("k",): cache.get(what, params, compute), calls


def test_hits_while_the_parameters_view_the_same_memory():
    p = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    cache = FrozenCache(4)
    get, calls = counting(cache, [p])
    get()
    get()
    cache.get(("k",), [p.detach()], lambda: calls.append("detached"))  # same storage: a hit
    assert calls == [1]


def test_misses_after_in_place_updates_swaps_and_for_new_keys():
    p = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    cache = FrozenCache(4)
    get, calls = counting(cache, [p])
    get()
    with torch.no_grad():
        p.add_(1.0)  # bumps the version counter
    get()
    get(("other",))
    assert len(calls) == 3
    seen = []
    cache.get(("k",), [p.clone()], lambda: seen.append(1))  # other memory, same values
    assert seen == [1]
    with torch.inference_mode():  # inference tensors are kept apart
        cache.get(("k",), [p], lambda: seen.append(2))
    assert seen == [1, 2]


def test_untrackable_parameters_are_computed_every_time():
    with torch.inference_mode():
        p = torch.randn(3)  # an inference tensor has no version counter
    cache = FrozenCache(4)
    seen = []
    for _ in range(2):
        cache.get(("k",), [p], lambda: seen.append(1))
    assert seen == [1, 1] and len(cache) == 0


def test_least_recently_used_entries_go_and_copies_start_empty():
    p = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    cache = FrozenCache(2)
    for what in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        cache.get((what,), [p], lambda: torch.zeros(1))
    seen = []
    cache.get(("a",), [p], lambda: seen.append("a"))
    cache.get(("b",), [p], lambda: seen.append("b"))
    assert seen == ["b"] and len(cache) == 2
    assert len(copy.deepcopy(cache)) == 0 and len(pickle.loads(pickle.dumps(cache))) == 0


def test_misses_when_the_storage_is_reallocated_in_place():
    p = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    cache = FrozenCache(4)
    get, calls = counting(cache, [p])
    get()
    storage = p.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)  # as FSDP frees a parameter ...
    storage.resize_(nbytes)  # ... and gathers it again: same objects, new memory
    get()
    assert len(calls) == 2


def test_hyena_filters_follow_the_decay_buffer():
    from spadeformer.ssm import Hyena

    m = Hyena(4, trainable=False).eval()
    x = torch.randn(1, 12, 4)
    y = m(x)
    swapped = torch.func.functional_call(m, {"decay_rates": 2 * m.decay_rates}, (x,))
    assert not torch.allclose(swapped, y)
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)
