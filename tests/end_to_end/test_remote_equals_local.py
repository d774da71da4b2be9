"""Property tests: ops drawn from a catalogue give, on a worker, exactly what they give locally."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import torchremote as tr

FLOAT = [torch.float32, torch.float64]
SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)

UNARY = [torch.neg, torch.abs, torch.exp, torch.tanh, torch.sigmoid, torch.relu, torch.sin, torch.floor,
         torch.Tensor.sqrt, torch.Tensor.square, F.gelu, F.silu, lambda x: -x, lambda x: x.T,
         lambda x: x.mT if x.dim() >= 2 else x, lambda x: x.clamp(-0.5, 0.5), lambda x: x.reshape(-1),
         lambda x: x.flip(0), lambda x: x.cumsum(0), lambda x: x.softmax(-1), lambda x: x.to(torch.float16),
         lambda x: x.int(), lambda x: x.unsqueeze(0), lambda x: x.contiguous(), lambda x: x.clone()]
BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, torch.maximum, torch.minimum,
          torch.atan2, operator.lt, operator.ge, operator.eq, lambda a, b: torch.add(a, b, alpha=2),
          lambda a, b: torch.where(a > b, a, b), lambda a, b: a.lerp(b, 0.3)]
REDUCE = [lambda x, d, k: x.sum(d, keepdim=k), lambda x, d, k: x.mean(d, keepdim=k),
          lambda x, d, k: x.amax(d, keepdim=k), lambda x, d, k: x.prod(d, keepdim=k),
          lambda x, d, k: torch.max(x, d, keepdim=k), lambda x, d, k: x.std(d, keepdim=k),
          lambda x, d, k: torch.sort(x, d), lambda x, d, k: x.argmax(d, keepdim=k),
          lambda x, d, k: x.logsumexp(d, keepdim=k), lambda x, d, k: x.norm(dim=d, keepdim=k),
          lambda x, d, k: x.sum(), lambda x, d, k: x.all(), lambda x, d, k: torch.topk(x, 1, d)]
SCALARS = st.one_of(st.integers(-3, 3), st.floats(-2, 2, allow_nan=False, width=32), st.booleans())


def fetch(value):
    """Everything remote in an output structure, fetched; what is local stays."""
    if isinstance(value, tr.RemoteTensor):
        return value.get()
    if isinstance(value, tuple) and hasattr(value, "_fields") or type(value).__module__ == "torch.return_types":
        return type(value)([fetch(v) for v in value])
    if isinstance(value, (list, tuple)):
        return type(value)(fetch(v) for v in value)
    return value


def assert_same(remote, local):
    got = fetch(remote)
    if isinstance(local, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == local.dtype and got.shape == local.shape
        torch.testing.assert_close(got, local, rtol=0, atol=0, equal_nan=True)
    elif isinstance(local, (list, tuple)):
        assert type(got) is type(local) and len(got) == len(local)
        for g, l in zip(got, local):
            assert_same(g, l)
    else:
        assert got == local


def assert_same_outcome(remote_fn, local_fn):
    """The same value, or the same exception type (raised at once or at the fetch) as local torch."""
    try:
        local = local_fn()
    except Exception as e:
        expected = type(e)
    else:
        assert_same(remote_fn(), local)
        return
    try:
        fetch(remote_fn())
    except expected:
        return
    raise AssertionError(f"local torch raised {expected.__name__}; the remote call did not")


@st.composite
def float_tensor(draw, shape=None):
    shape = shape if shape is not None else draw(SHAPES)
    dtype = draw(st.sampled_from(FLOAT))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def broadcastable_pair(draw):
    shape = draw(SHAPES)
    other = tuple(1 if draw(st.booleans()) else s for s in shape)[draw(st.integers(0, len(shape) - 1)):]
    a, b = draw(float_tensor(shape)), draw(float_tensor(other))
    return a, b.to(a.dtype) if draw(st.booleans()) else b


COMMON = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # examples: conftest profile


@COMMON
@given(float_tensor(), st.sampled_from(UNARY))
def test_unary(bob, x, op):
    assert_same(op(x.send(bob)), op(x))


@COMMON
@given(broadcastable_pair(), st.sampled_from(BINARY), st.booleans())
def test_binary_with_broadcasting_and_local_operands(bob, pair, op, second_local):
    a, b = pair
    rb = b if second_local else b.send(bob)
    assert_same_outcome(lambda: op(a.send(bob), rb), lambda: op(a, b))


@COMMON
@given(float_tensor(), st.sampled_from([operator.add, operator.mul, operator.sub, operator.truediv,
                                        operator.pow, torch.add, torch.mul]), SCALARS, st.booleans())
def test_type_promotion_with_python_scalars(bob, x, op, scalar, reflected):
    def apply(t):
        return op(scalar, t) if reflected else op(t, scalar)

    for t in (x, (x * 3).to(torch.int64), x > 0):
        assert_same_outcome(lambda: apply(t.send(bob)), lambda: apply(t))


@COMMON
@given(float_tensor(), st.sampled_from(REDUCE), st.data())
def test_reductions(bob, x, op, data):
    d = data.draw(st.integers(-x.dim(), x.dim() - 1))
    k = data.draw(st.booleans())
    assert_same(op(x.send(bob), d, k), op(x, d, k))


@COMMON
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.sampled_from(FLOAT), st.integers(0, 99))
def test_matmul_family(bob, n, k, p, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, k, generator=g, dtype=dtype), torch.randn(k, p, generator=g, dtype=dtype)
    v = torch.randn(k, generator=g, dtype=dtype)
    ra, rb, rv = a.send(bob), b.send(bob), v.send(bob)
    assert_same(ra @ rb, a @ b)
    assert_same(torch.mm(ra, b), torch.mm(a, b))
    assert_same(ra @ rv, a @ v)
    assert_same(torch.einsum("ij,jk->ik", ra, rb), torch.einsum("ij,jk->ik", a, b))
    assert_same(F.linear(ra, rb.T), F.linear(a, b.T))
    assert_same(torch.bmm(ra[None], rb[None]), torch.bmm(a[None], b[None]))
    assert_same(a @ rb, a @ b)  # a local left operand: reflected __rmatmul__


INDICES = st.sampled_from([
    lambda x: x[0], lambda x: x[-1], lambda x: x[1:], lambda x: x[::2], lambda x: x[..., 0],
    lambda x: x[None], lambda x: x[:, None] if x.dim() > 1 else x[None],
    lambda x: x[torch.tensor([0, 0])], lambda x: x[x > 0], lambda x: x[[0, -1]],
    lambda x: x.narrow(0, 0, 1), lambda x: x.select(0, 0), lambda x: x.index_select(0, torch.tensor([0])),
    lambda x: torch.gather(x, 0, torch.zeros_like(x, dtype=torch.long)),
])


@COMMON
@given(float_tensor(), INDICES)
def test_indexing_slicing_and_advanced_indexing(bob, x, index):
    assert_same(index(x.send(bob)), index(x))


MUTATIONS = st.sampled_from([
    lambda v: v.add_(1), lambda v: v.mul_(2), lambda v: v.zero_(), lambda v: v.fill_(7.),
    lambda v: v.clamp_(0, 1), lambda v: v.copy_(torch.ones_like(v)), lambda v: v.__setitem__(0, -5.),
    lambda v: v.__setitem__(Ellipsis, 2.), lambda v: v.__iadd__(3), lambda v: v.exp_(),
])
VIEWS = st.sampled_from([lambda x: x[0], lambda x: x[:1], lambda x: x.view(-1), lambda x: x.T,
                         lambda x: x.unsqueeze(0), lambda x: x[..., -1:], lambda x: x.diagonal()
                         if x.dim() >= 2 else x[:], lambda x: x.transpose(0, -1)])


@COMMON
@given(float_tensor(), VIEWS, MUTATIONS)
def test_views_alias_and_in_place_mutation(bob, x, view, mutate):
    local = x.clone()
    remote = x.send(bob)
    lv, rv = view(local), view(remote)
    if lv.dim() == 0 and mutate in ():
        return
    try:
        lres = mutate(lv)
    except Exception as e:
        expected = type(e)
        try:
            mutate(rv)
            bob.sync()
        except expected:
            return
        raise AssertionError(f"expected {expected.__name__}")
    rres = mutate(rv)
    if isinstance(lres, torch.Tensor):
        assert rres is rv  # in place returns the very object
    assert_same(remote, local)  # the base changed through its view
    assert_same(rv, lv)


@COMMON
@given(st.lists(float_tensor(shape=(2, 3)), min_size=1, max_size=4), st.integers(-2, 1), st.integers(1, 3))
def test_concatenation_and_split(bob, xs, dim, size):
    rs = [x.send(bob) for x in xs]
    assert_same(torch.cat(rs, dim), torch.cat(xs, dim))
    assert_same(torch.stack(rs), torch.stack(xs))
    assert_same(torch.split(rs[0], size, dim), torch.split(xs[0], size, dim))
    assert_same(rs[0].chunk(2, dim), xs[0].chunk(2, dim))
    assert_same(rs[0].unbind(dim), xs[0].unbind(dim))
    assert_same(list(rs[0]), list(xs[0]))  # iteration


@COMMON
@given(broadcastable_pair())
def test_comparisons_and_python_values(bob, pair):
    a, b = pair
    b = b.to(a.dtype)  # isclose, equal and allclose want one dtype, locally too
    ra, rb = a.send(bob), b.send(bob)
    assert_same(ra > rb, a > b)
    assert_same(torch.isclose(ra, rb), torch.isclose(a, b))
    assert bool((ra >= rb).any()) == bool((a >= b).any())
    assert torch.equal(ra, ra) is True and torch.equal(ra, rb) == torch.equal(a, b)
    assert ra.sum().item() == a.sum().item()
    assert ra.tolist() == a.tolist()
    assert torch.allclose(ra, ra + 0)
    assert_same(ra.nonzero(), a.nonzero())
    assert_same(torch.unique(ra > 0), torch.unique(a > 0))
    assert_same(ra.masked_select(ra > 0), a.masked_select(a > 0))


def test_out_argument_writes_into_the_remote_tensor(bob):
    a = torch.arange(4.)
    out = torch.empty(4).send(bob)
    res = torch.add(a.send(bob), 1, out=out)
    assert res is out
    assert torch.equal(out.get(), a + 1)
    vals, idx = torch.empty(0).send(bob), torch.empty(0, dtype=torch.long).send(bob)
    torch.max(torch.tensor([[1., 5], [7, 2]]).send(bob), 1, out=(vals, idx))
    assert vals.get().tolist() == [5., 7.] and idx.get().tolist() == [1, 0]
