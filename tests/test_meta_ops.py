"""`measure.meta_ops.MetaOpCache`: what it answers from the cache, and what it never does."""

import torch

from velora_cli.measure.meta_ops import MetaOpCache

aten = torch.ops.aten


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_a_functional_op_is_answered_from_the_cache_with_fresh_tensors():
    cache = MetaOpCache()
    a, b = meta(8, 4), meta(4, 3)
    first = cache.call(aten.mm.default, (a, b), {})
    second = cache.call(aten.mm.default, (meta(8, 4), meta(4, 3)), {})
    assert (cache.misses, cache.hits) == (1, 1)
    assert (second.shape, second.stride(), second.dtype) == (
        first.shape,
        first.stride(),
        first.dtype,
    )
    assert second.untyped_storage()._cdata != first.untyped_storage()._cdata  # a new storage
    assert second.untyped_storage().nbytes() == first.untyped_storage().nbytes()
    cache.call(aten.mm.default, (meta(8, 4).t().contiguous().t(), b), {})  # other strides
    assert cache.misses == 2


def test_multiple_outputs_keep_their_structure():
    cache = MetaOpCache()
    x = meta(6, 5)
    for _ in range(2):
        values, indices = cache.call(aten.max.dim, (x, 1), {})
    assert cache.hits == 1
    assert (values.shape, indices.dtype) == ((6,), torch.int64)


def test_views_are_never_cached():
    cache = MetaOpCache()
    x = meta(4, 6)
    for _ in range(2):
        v = cache.call(aten.view.default, (x, [6, 4]), {})
        assert v.untyped_storage()._cdata == x.untyped_storage()._cdata  # still a view of x
    assert (cache.hits, cache.misses, cache.bypassed) == (0, 0, 2)


def test_an_op_writing_a_meta_tensor_returns_it_without_running_again():
    cache = MetaOpCache()
    x, y = meta(4, 4), meta(4, 4)
    assert cache.call(aten.add_.Tensor, (x, y), {}) is x
    assert cache.call(aten.add_.Tensor, (y, x), {}) is y
    assert cache.hits == 1
    lists = [meta(3), meta(5)]
    for _ in range(2):
        assert cache.call(aten._foreach_mul_.Scalar, (lists, 0.5), {}) is None
    assert cache.hits == 2


def test_writes_to_real_tensors_always_run():
    cache = MetaOpCache()
    steps = [torch.zeros(()), torch.zeros(())]
    for _ in range(2):
        cache.call(aten._foreach_add_.Scalar, (steps, 1.0), {})
    assert [float(s) for s in steps] == [2.0, 2.0] and cache.hits == 0


def test_an_op_that_changes_its_argument_shape_is_not_cached():
    cache = MetaOpCache()
    out = meta(0)
    cache.call(aten.mul.out, (meta(4, 4), meta(4, 4)), {"out": out})  # resizes out to (4, 4)
    again = meta(0)
    cache.call(aten.mul.out, (meta(4, 4), meta(4, 4)), {"out": again})
    assert again.shape == (4, 4) and cache.hits == 0
    grown = meta(2)
    cache.call(aten.resize_.default, (grown, [8]), {})
    grown2 = meta(2)
    cache.call(aten.resize_.default, (grown2, [8]), {})
    assert grown2.shape == (8,) and cache.hits == 0


def test_an_in_place_foreach_op_with_other_step_sizes_is_answered_from_the_cache():
    # AdamW's foreach step passes its per-parameter step sizes as a float list that changes
    # every step: floats decide no metadata of an elementwise in-place op, so the list is keyed
    # by its length and item types
    cache = MetaOpCache()
    params, avg, denom = [meta(3, 2), meta(5)], [meta(3, 2), meta(5)], [meta(3, 2), meta(5)]
    op = aten._foreach_addcdiv_.ScalarList
    assert cache.call(op, (params, avg, denom, [-1e-3, -2e-3]), {}) is None
    assert cache.call(op, (params, avg, denom, [-5e-4, -7e-4]), {}) is None
    assert (cache.misses, cache.hits) == (1, 1)
    other = [meta(3, 3), meta(5)]
    cache.call(op, (other, other, other, [-5e-4, -7e-4]), {})  # other shapes
    assert cache.misses == 2
    pow_ = aten._foreach_pow_.ScalarList  # ints keep their values in the key
    for exponents in ([2, 3], [2, 4], [2.5, 3]):
        cache.call(pow_, (params, exponents), {})
    assert (cache.misses, cache.hits) == (5, 1)  # [2.5, 3] answers as [0.0, 3]: a new key
    cache.call(pow_, (params, [1.5, 3]), {})
    assert cache.hits == 2


def test_parameters_are_keyed_as_tensors_of_their_own_type():
    # optimizer ops take the parameters themselves (AdamW's _foreach_addcdiv_ on every weight,
    # under no_grad as the optimizer runs it)
    with torch.no_grad():
        cache = MetaOpCache()
        params = [torch.nn.Parameter(meta(3, 2)), torch.nn.Parameter(meta(5))]
        moments = [meta(3, 2), meta(5)]
        for _ in range(2):
            assert (
                cache.call(aten._foreach_addcdiv_.Scalar, (params, moments, moments, -1e-3), {})
                is None
            )
        assert (cache.misses, cache.hits, cache.bypassed) == (1, 1, 0)
        cache.call(aten._foreach_addcdiv_.Scalar, (moments, moments, moments, -1e-3), {})
        assert cache.misses == 2  # plain tensors of the same shapes: another key
        out = cache.call(aten.mm.default, (meta(4, 3), params[0]), {})
        again = cache.call(aten.mm.default, (meta(4, 3), params[0]), {})
        assert type(out) is type(again) is torch.Tensor and again.shape == (4, 2)
        assert cache.hits == 2
