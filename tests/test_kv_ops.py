"""kv_pack / kv_pack_into / kv_unpack / kv_compact: reference equality, round trips,
quantization bounds, opcheck, torch.compile and bad inputs."""
import itertools
import random

import pytest
import torch

import disagg  # noqa: F401  (registers the ops)
from disagg import ops, reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK_SIZES = [1, 8, 16, 64, 256]


def make_caches(layers, num_blocks, bs, heads, dim, dtype=torch.float32, layout="NHD", seed=0):
    """Fresh random caches (never zeros), in the requested layout."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, 2, bs, heads, dim) if layout == "NHD" else (num_blocks, 2, heads, bs, dim)
    return [(torch.randn(shape, generator=g) * 3).to(dtype) for _ in range(layers)]


def random_table(num_tokens, bs, num_blocks, seed=0, extra=0):
    """A shuffled (non-contiguous) block table with `extra` spare entries at the end."""
    n = -(-num_tokens // bs) + extra
    assert n <= num_blocks
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=g)[:n].to(torch.int32)


def nhd(c, layout):
    return c.transpose(2, 3) if layout == "HND" else c


def tokens_of(caches, table, num_tokens, layout, heads=None):
    """[L, 2, T, H, D] values of a request, read with plain indexing."""
    out = []
    for c in caches:
        v = nhd(c, layout)
        bs = v.shape[2]
        pos = torch.arange(num_tokens)
        x = v[table.long()[pos // bs], :, pos % bs]  # [T, 2, H, D]
        if heads is not None:
            x = x[:, :, heads[0]:heads[1]]
        out.append(x.transpose(0, 1))
    return torch.stack(out)


# ---- pack -------------------------------------------------------------------------------------

PACK_CASES = [
    # block size, heads, head_dim, tokens (partial last block unless a multiple), dtype
    (bs, h, d, t, DTYPES[i % 3])
    for i, (bs, h, d) in enumerate(itertools.product(BLOCK_SIZES, [1, 2, 8], [32, 64, 128]))
    for t in [max(1, (2 * bs + bs // 2 + 1) if bs < 64 else bs + 3)]
]


@pytest.mark.parametrize("bs,heads,dim,tokens,dtype", PACK_CASES)
def test_pack_matches_reference(bs, heads, dim, tokens, dtype):
    layout = "HND" if (bs + heads) % 3 == 0 else "NHD"
    nb = -(-tokens // bs) + 2
    caches = make_caches(2, nb, bs, heads, dim, dtype, layout, seed=bs * heads + dim)
    table = random_table(tokens, bs, nb, seed=dim, extra=1)
    got = ops.kv_pack(caches, table, tokens, layout=layout)
    want = ref.kv_pack(caches, table, tokens, layout=layout)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want)
    info = ops.kv_buffer_info(got)
    assert (info.num_layers, info.num_tokens, info.num_heads, info.head_dim, info.dtype) == (
        2, tokens, heads, dim, dtype)
    # the payload holds exactly the request's tokens, in order
    payload = got[64:64 + info.num_layers * 2 * tokens * heads * dim * dtype.itemsize]
    assert torch.equal(payload.view(dtype).view(2, 2, tokens, heads, dim),
                       tokens_of(caches, table, tokens, layout))


@pytest.mark.parametrize("layers,heads,quant,layout", [
    ((1, 3), (0, 8), "none", "NHD"),
    ((2, 4), (2, 6), "none", "NHD"),
    ((0, 4), (3, 4), "none", "HND"),
    ((3, 4), (0, 2), "int8", "NHD"),
    ((0, 2), (4, 8), "fp8_e4m3", "HND"),
    ((1, 1), (0, 8), "none", "NHD"),  # an empty layer range is a valid (header-only) buffer
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_layer_and_head_ranges(layers, heads, quant, layout, dtype):
    bs, T = 16, 37
    caches = make_caches(4, 8, bs, 8, 32, dtype, layout, seed=7)
    table = random_table(T, bs, 8, seed=3)
    kw = dict(layer_start=layers[0], layer_end=layers[1], head_start=heads[0], head_end=heads[1],
              quant=quant, layout=layout)
    got = ops.kv_pack(caches, table, T, **kw)
    assert torch.equal(got, ref.kv_pack(caches, table, T, **kw))
    info = ops.kv_buffer_info(got)
    assert (info.layer_start, info.head_start, info.num_heads, info.quant) == (
        layers[0], heads[0], heads[1] - heads[0], quant)
    assert got.numel() == info.nbytes == ops.kv_pack_nbytes(
        layers[1] - layers[0], T, heads[1] - heads[0], 32, dtype, quant, bs)


def test_pack_into_preallocated_buffer():
    caches = make_caches(3, 6, 8, 2, 32, torch.bfloat16, seed=1)
    table = random_table(20, 8, 6, seed=1)
    want = ops.kv_pack(caches, table, 20, head_start=1, quant="int8")
    out = torch.full((want.numel() + 100,), 0xAB, dtype=torch.uint8)
    n = ops.kv_pack_into(caches, table, 20, out, head_start=1, quant="int8")
    assert n == want.numel()
    assert torch.equal(out[:n], want)
    assert (out[n:] == 0xAB).all()  # nothing written past the packed size


def test_pack_zero_tokens():
    caches = make_caches(2, 4, 8, 2, 32)
    buf = ops.kv_pack(caches, torch.empty(0, dtype=torch.int32), 0)
    assert ops.kv_buffer_info(buf).num_tokens == 0
    assert torch.equal(buf, ref.kv_pack(caches, torch.empty(0, dtype=torch.int32), 0))


# ---- unpack -----------------------------------------------------------------------------------

UNPACK_CASES = [
    (sb, db, DTYPES[i % 3], DTYPES[(i // 3) % 3], ["NHD", "HND"][i % 2], ["NHD", "HND"][(i // 2) % 2])
    for i, (sb, db) in enumerate(itertools.product(BLOCK_SIZES, BLOCK_SIZES))
]


@pytest.mark.parametrize("src_bs,dst_bs,src_dtype,dst_dtype,src_layout,dst_layout", UNPACK_CASES)
def test_unpack_every_block_size_conversion(src_bs, dst_bs, src_dtype, dst_dtype, src_layout,
                                            dst_layout):
    T, H, D = 300 if max(src_bs, dst_bs) == 256 else 45, 2, 32
    src = make_caches(2, -(-T // src_bs) + 1, src_bs, H, D, src_dtype, src_layout, seed=src_bs)
    st = random_table(T, src_bs, src[0].shape[0], seed=1)
    buf = ops.kv_pack(src, st, T, layout=src_layout)
    nb = -(-T // dst_bs) + 2
    dst = make_caches(3, nb, dst_bs, H, D, dst_dtype, dst_layout, seed=99)  # random = poisoned
    want = [c.clone() for c in dst]
    dt = random_table(T, dst_bs, nb, seed=2)
    ops.kv_unpack(buf, dst, dt, layer_start=1, layout=dst_layout)
    ref.kv_unpack(buf, want, dt, layer_start=1, layout=dst_layout)
    for a, b in zip(dst, want):
        assert torch.equal(a, b)  # including every slot that must stay untouched
    got = tokens_of(dst[1:], dt, T, dst_layout)
    torch.testing.assert_close(got, tokens_of(src, st, T, src_layout).to(dst_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs_pair", [(16, 16), (16, 64), (64, 8), (1, 256)])
def test_round_trip_bit_exact(dtype, bs_pair):
    T = 333
    src = make_caches(3, -(-T // bs_pair[0]) + 1, bs_pair[0], 4, 64, dtype, seed=5)
    st = random_table(T, bs_pair[0], src[0].shape[0], seed=5)
    buf = ops.kv_pack(src, st, T)
    dst = make_caches(3, -(-T // bs_pair[1]) + 1, bs_pair[1], 4, 64, dtype, "HND", seed=6)
    dt = random_table(T, bs_pair[1], dst[0].shape[0], seed=6)
    ops.kv_unpack(buf, dst, dt, layout="HND")
    # packing the destination again gives the same bytes apart from nothing (no quant)
    again = ops.kv_pack(dst, dt, T, layout="HND")
    assert torch.equal(again[64:], buf[64:])
    assert torch.equal(tokens_of(dst, dt, T, "HND").view(torch.uint8),
                       tokens_of(src, st, T, "NHD").view(torch.uint8))


def test_unpack_head_slices_reassemble():
    """Two receivers' halves (TP 2 -> TP 1): packing head slices and placing them recreates the
    full cache; the other heads stay untouched until their slice arrives."""
    T, bs = 50, 16
    src = make_caches(2, 5, bs, 8, 32, torch.bfloat16, seed=3)
    st = random_table(T, bs, 5)
    dst = make_caches(2, 9, 8, 8, 32, torch.bfloat16, "HND", seed=4)
    before = [c.clone() for c in dst]
    dt = random_table(T, 8, 9, seed=8)
    lo = ops.kv_pack(src, st, T, head_start=0, head_end=4)
    ops.kv_unpack(lo, dst, dt, head_start=0, layout="HND")
    assert torch.equal(tokens_of(dst, dt, T, "HND", (4, 8)), tokens_of(before, dt, T, "HND", (4, 8)))
    hi = ops.kv_pack(src, st, T, head_start=4, head_end=8)
    ops.kv_unpack(hi, dst, dt, head_start=4, layout="HND")
    assert torch.equal(tokens_of(dst, dt, T, "HND"), tokens_of(src, st, T, "NHD"))


def test_unpack_layer_by_layer():
    T, bs = 40, 8
    src = make_caches(4, 6, bs, 2, 32, seed=11)
    st = random_table(T, bs, 6)
    dst = make_caches(4, 3, 16, 2, 32, seed=12)
    dt = random_table(T, 16, 3)
    for layer in range(4):  # as a prefill worker would ship them
        buf = ops.kv_pack(src, st, T, layer_start=layer, layer_end=layer + 1)
        ops.kv_unpack(buf, dst, dt, layer_start=ops.kv_buffer_info(buf).layer_start)
    assert torch.equal(tokens_of(dst, dt, T, "NHD"), tokens_of(src, st, T, "NHD"))


@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16])
def test_dtype_conversion_every_16_bit_pattern(src_dtype):
    """Widening in unpack equals torch's cast on all 65,536 patterns (inf, NaN, subnormals)."""
    pats = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(src_dtype)
    caches = [pats.view(-1, 1, 16, 1, 64).expand(-1, 2, 16, 1, 64).contiguous()]
    nb = caches[0].shape[0]
    table = torch.arange(nb, dtype=torch.int32)
    buf = ops.kv_pack(caches, table, nb * 16)
    dst = make_caches(1, nb, 16, 1, 64, torch.float32, seed=1)
    ops.kv_unpack(buf, dst, table)
    assert torch.equal(dst[0].view(torch.int32), caches[0].float().view(torch.int32))


@pytest.mark.parametrize("dst_dtype", [torch.float16, torch.bfloat16])
def test_dtype_conversion_narrowing_matches_torch(dst_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40000, generator=g) * 10.0 ** torch.randint(-9, 9, (40000,), generator=g),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0,
                                 65520.0, 65519.99, 6.0e-8, 2.98e-8, 2.99e-8, 3.4e38, 1e-45,
                                 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -11])])
    x = torch.cat([x, torch.zeros(-x.numel() % 1024)])
    caches = [x.view(-1, 1, 16, 1, 64).expand(-1, 2, 16, 1, 64).contiguous()]
    nb = caches[0].shape[0]
    table = torch.arange(nb, dtype=torch.int32)
    dst = make_caches(1, nb, 16, 1, 64, dst_dtype, seed=1)
    ops.kv_unpack(ops.kv_pack(caches, table, nb * 16), dst, table)
    torch.testing.assert_close(dst[0], caches[0].to(dst_dtype), rtol=0, atol=0, equal_nan=True)


def test_conversions_do_not_depend_on_flush_denormal_mode():
    """Subnormal f16 values and subnormal fp8 codes decode the same with FTZ/DAZ on (small ops
    run on the calling thread, whose mode torch.set_flush_denormal sets)."""
    pats = torch.arange(0, 1024, dtype=torch.int32).to(torch.int16)
    pats = torch.cat([pats, pats | -32768]).view(torch.float16)  # +/- all subnormals and zero
    caches = [pats.view(-1, 1, 1, 1, 64).expand(-1, 2, 1, 1, 64).contiguous()]
    nb = caches[0].shape[0]
    table = torch.arange(nb, dtype=torch.int32)
    buf = ops.kv_pack(caches, table, nb)
    # fp8: a group with amax 448 so that the scale is 1 and small values land on the subnormal grid
    x = torch.tensor([448.0] + [k * 2.0 ** -9 for k in range(-7, 8)] + [2.0 ** -6] * 48)
    qsrc = [x.view(1, 1, 1, 1, 64).expand(1, 2, 1, 1, 64).contiguous()]
    qbuf = ops.kv_pack(qsrc, torch.zeros(1, dtype=torch.int32), 1, quant="fp8_e4m3")
    want = [c.float() for c in caches]
    qwant = torch.empty(1, 2, 1, 1, 64)
    ops.kv_unpack(qbuf, [qwant], torch.zeros(1, dtype=torch.int32))
    assert torch.equal(qwant, qsrc[0])  # every value is on the fp8 grid: exact
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        dst = [torch.empty(nb, 2, 1, 1, 64)]
        ops.kv_unpack(buf, dst, table)
        qdst = [torch.empty(1, 2, 1, 1, 64)]
        ops.kv_unpack(qbuf, qdst, torch.zeros(1, dtype=torch.int32))
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(dst[0].view(torch.int32), want[0].view(torch.int32))
    assert torch.equal(qdst[0], qsrc[0])


# ---- quantization -----------------------------------------------------------------------------


def _fp8_bound(x, amax):
    """Per-element bound for fp8 e4m3 with the power-of-two scale 2^k (amax * 2^-k in
    (224, 448]): half an ulp of 3 mantissa bits (|x|/16) for normals, half the subnormal step
    (2^-10 in scaled units) below 2^-6; the documented bound max(|x|/16, amax/448 * 2^-9) is
    looser by up to 2x in the second term."""
    scale, _ = ref._fp8_pow2_scale(amax)
    assert (scale <= amax / 224).all() and (amax <= 448 * scale).all()
    return torch.maximum(x.abs() / 16, scale * 2.0 ** -10)


@pytest.mark.parametrize("quant", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("bs,dst_bs", [(16, 16), (8, 64), (64, 1)])
def test_quantized_round_trip_within_bound(quant, src_dtype, bs, dst_bs):
    T, H, D = 70, 4, 64
    src = make_caches(2, -(-T // bs) + 1, bs, H, D, src_dtype, seed=21)
    # outliers in some (block, head) groups, an all-equal row, a zero group, tiny values
    src[0][0, 0, 0, 0, 5] = 1000.0
    st = random_table(T, bs, src[0].shape[0], seed=2)
    src[1][int(st[1]), 0, :, 0, :] = -7.25  # an all-equal (block, head) group: tokens bs..2bs-1
    b0 = int(st[0])
    src[0][b0, 1, :, 3, :] = 0.0
    src[1][b0, 0, :, 1, :] *= 1e-4
    buf = ops.kv_pack(src, st, T, quant=quant)
    assert torch.equal(buf, ref.kv_pack(src, st, T, quant=quant))  # bit-exact with the reference
    dst = make_caches(2, -(-T // dst_bs) + 1, dst_bs, H, D, torch.float32, seed=22)
    dt = random_table(T, dst_bs, dst[0].shape[0], seed=3)
    ops.kv_unpack(buf, dst, dt)
    want = [c.clone() for c in dst]
    ref.kv_unpack(buf, want, dt)
    assert all(torch.equal(a, b) for a, b in zip(dst, want))
    x = tokens_of(src, st, T, "NHD").float()  # [L, 2, T, H, D]
    y = tokens_of(dst, dt, T, "NHD")
    # amax per (layer, kv, source block, head), broadcast back to tokens
    nblk = -(-T // bs)
    pad = torch.zeros(2, 2, nblk * bs, H, D)
    pad[:, :, :T] = x.abs()
    amax = pad.view(2, 2, nblk, bs, H, D).amax(dim=(3, 5))
    amax_t = amax[:, :, torch.arange(T) // bs][..., None]  # [L, 2, T, H, 1]
    err = (y - x).abs()
    if quant == "int8":
        bound = amax_t / 254 * (1 + 1e-5)
    else:
        bound = _fp8_bound(x, amax_t) * (1 + 1e-5)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    # zero groups stay exactly zero
    assert (y[0, 1, :, 3][torch.arange(T) < bs] == 0).all()
    eq = y[1, 0, bs:2 * bs if 2 * bs <= T else T, 0]
    if quant == "int8":
        # a group's maximum (hence an all-equal group: every element is the maximum) comes back
        # to within float32 rounding of scale * 127
        at_max = x.abs() == amax_t
        torch.testing.assert_close(y[at_max], x[at_max], rtol=1e-6, atol=0)
        torch.testing.assert_close(eq, torch.full_like(eq, -7.25), rtol=1e-6, atol=0)
    else:
        # fp8's power-of-two scale is exact, so an all-equal group decodes to one value:
        # -7.25 rounded to e4m3 in its binade (1.8125 * 4 -> 1.75 * 4, ties to even)
        assert (eq == -7.0).all()


def test_quantized_to_bf16_destination():
    T = 33
    src = make_caches(1, 4, 16, 2, 32, torch.float32, seed=4)
    st = random_table(T, 16, 4)
    for quant in ["int8", "fp8_e4m3"]:
        buf = ops.kv_pack(src, st, T, quant=quant)
        dst = make_caches(1, 3, 16, 2, 32, torch.bfloat16, seed=5)
        dt = random_table(T, 16, 3)
        ops.kv_unpack(buf, dst, dt)
        want = [c.clone() for c in dst]
        ref.kv_unpack(buf, want, dt)
        assert torch.equal(dst[0], want[0])


def test_quantized_pack_rejects_non_finite():
    caches = make_caches(1, 2, 8, 1, 32)
    table = torch.tensor([1, 0], dtype=torch.int32)
    caches[0][0, 1, 3, 0, 7] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        ops.kv_pack(caches, table, 16, quant="int8")
    caches[0][0, 1, 3, 0, 7] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        ops.kv_pack(caches, table, 16, quant="fp8_e4m3")
    # without quantization inf and NaN travel unchanged
    buf = ops.kv_pack(caches, table, 16)
    dst = make_caches(1, 2, 8, 1, 32)
    ops.kv_unpack(buf, dst, table)
    assert torch.equal(dst[0].view(torch.int32), caches[0].view(torch.int32))


def test_fp8_conversion_matches_torch():
    """Our torch-free float -> e4m3fn (through an fp8 pack with scale 1) equals torch's cast,
    on every bf16 bit pattern in range and on the rounding boundaries."""
    # every finite bf16 value with |x| <= 448 (scale is amax/448 = 1 when amax = 448)
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    vals = bits[torch.isfinite(bits) & (bits.abs() <= 448)]
    edges = torch.tensor([448.0, -448.0, 447.9, 2.0 ** -6, 2.0 ** -7 * 1.5, 2.0 ** -9 * 0.5,
                          2.0 ** -9 * 1.5, 2.0 ** -10, 2.0 ** -10 * 1.0001, 0.0, -0.0, 1.0625,
                          1.1875, 240.0, 232.0, 3.0 * 2.0 ** -9 / 2])
    vals = torch.cat([vals, edges, torch.rand(20000) * 896 - 448])
    D = 64
    n = -(-vals.numel() // D) * D
    row = torch.full((n,), 448.0)
    row[:vals.numel()] = vals
    # one token per block, one head: each row of D values is one (block, head) group whose amax
    # must be exactly 448 so that the scale is 1; force it into every row's last element
    row = row.view(-1, D)
    row[:, -1] = 448.0
    caches = [row.view(-1, 1, 1, 1, D).expand(-1, 2, 1, 1, D).contiguous()]
    nblk = caches[0].shape[0]
    table = torch.arange(nblk, dtype=torch.int32)
    buf = ops.kv_pack(caches, table, nblk, quant="fp8_e4m3")
    q = buf[64:64 + nblk * D].view(nblk, D)
    assert torch.equal(q, row.to(torch.float8_e4m3fn).view(torch.uint8))
    scales = buf[(64 + 2 * nblk * D + 15) // 16 * 16:].view(torch.float32)
    assert (scales == 1.0).all()


def _fp8_grid_and_midpoints():
    """Every finite e4m3fn value, every rounding midpoint between neighbours, and the float32
    neighbours (one ulp either side) of both, positive and negative, |x| <= 448."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    pos = torch.unique(codes[torch.isfinite(codes) & (codes >= 0)])  # 0 .. 448, sorted
    mids = (pos[1:] + pos[:-1]) / 2  # exact in float32
    base = torch.cat([pos, mids])
    around = torch.cat([base, torch.nextafter(base, torch.full_like(base, float("inf"))),
                        torch.nextafter(base, torch.zeros_like(base))])
    around = around[around <= 448.0]
    return torch.cat([around, -around, torch.tensor([-0.0])])


def test_fp8_encoder_every_value_and_midpoint_matches_torch():
    """The vectorized float -> e4m3fn encoder (through an fp32 pack with scale 1) equals torch's
    cast at every e4m3 value, every midpoint (ties to even) and their float32 neighbours."""
    vals = _fp8_grid_and_midpoints()
    D = 64
    n = -(-vals.numel() // (D - 1))
    rows = torch.full((n, D), 448.0)
    flat = rows[:, : D - 1].reshape(-1)
    flat[: vals.numel()] = vals
    rows[:, : D - 1] = flat.view(n, D - 1)  # the last column stays 448: scale 448/448 = 1
    caches = [rows.view(n, 1, 1, 1, D).expand(n, 2, 1, 1, D).contiguous()]
    table = torch.arange(n, dtype=torch.int32)
    buf = ops.kv_pack(caches, table, n, quant="fp8_e4m3")
    q = buf[64:64 + n * D].view(n, D)
    assert torch.equal(q, rows.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(buf, ref.kv_pack(caches, table, n, quant="fp8_e4m3"))


_KV_SIMD_CHILD = """
import sys, torch, disagg
from disagg import ops
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for quant in ("none", "int8", "fp8_e4m3"):
        g = torch.Generator().manual_seed(3)
        caches = [(torch.randn(40, 2, 16, 4, 64, generator=g) * 5).to(dtype) for _ in range(4)]
        caches[1][3, 0, 5, 2, 7] = 900.0  # an outlier in one group
        table = torch.randperm(40, generator=g)[:37].to(torch.int32)
        buf = ops.kv_pack(caches, table, 580, quant=quant)  # 4 layers x 2 x 580 x 4 x 64: > 4 MiB
        out.append(buf)
        dst = [torch.zeros(40, 2, 16, 4, 64, dtype=dtype) for _ in range(4)]
        ops.kv_unpack(buf, dst, table)
        out.extend(dst)
torch.save(out, sys.argv[1])
"""


def test_kv_simd_paths_give_the_same_bits(tmp_path):
    """The AVX-512, AVX2 and portable pack/unpack kernels (quantizing or not) agree bit for bit
    (each runs in its own process: the environment picks the path at load time); the buffers are
    large enough for the non-temporal store paths."""
    import os
    import subprocess
    import sys

    script = tmp_path / "kv.py"
    script.write_text(_KV_SIMD_CHILD)
    results = []
    for i, env in enumerate([{}, {"DISAGG_NO_AVX512": "1"}, {"DISAGG_NO_SIMD": "1"}]):
        path = tmp_path / f"out{i}.pt"
        subprocess.run([sys.executable, str(script), str(path)], check=True, timeout=300,
                       env={**os.environ, **env})
        results.append(torch.load(path))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_pack_zeroes_the_padding_before_the_scales():
    """The bytes between the payload and the 16-byte aligned scales are written (zeros), never
    left as whatever the buffer held."""
    caches = make_caches(1, 4, 8, 1, 35, torch.bfloat16, seed=4)  # payload of 420 / 210 bytes
    table = random_table(3, 8, 4, seed=4)
    for quant, elem in (("none", 2), ("int8", 1), ("fp8_e4m3", 1)):
        n = ops.kv_pack_nbytes(1, 3, 1, 35, torch.bfloat16, quant, 8)
        out = torch.full((n,), 0xEE, dtype=torch.uint8)
        ops.kv_pack_into(caches, table, 3, out, quant=quant)
        payload_end = 64 + 2 * 3 * 35 * elem
        scales_at = (payload_end + 15) // 16 * 16
        assert scales_at > payload_end  # the case has padding
        assert (out[payload_end:scales_at] == 0).all()
        assert torch.equal(out, ref.kv_pack(caches, table, 3, quant=quant))


def test_fp8_saturation_and_nan_codes_match_torch():
    """x * (448/amax) can only exceed 448 by rounding; the kernel's conversion must still agree
    with torch near and above the top of the range (checked through the reference path)."""
    for amax in [448.0, 1.0, 3.0e-3, 12345.678, 1e-30]:
        x = torch.linspace(-amax, amax, 1001)
        x[-1] = amax
        caches = [x[:1000].view(-1, 1, 1, 1, 100).expand(-1, 2, 1, 1, 100).contiguous()]
        caches[0][..., 0] = amax
        t = torch.arange(10, dtype=torch.int32)
        assert torch.equal(ops.kv_pack(caches, t, 10, quant="fp8_e4m3"),
                           ref.kv_pack(caches, t, 10, quant="fp8_e4m3"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_power_of_two_scales_over_the_exponent_range(dtype):
    """Groups whose maxima span the exponent range (scale 2^k for k from -126 to 120, both
    sides of the bf16 fast path's k >= -116), each holding values over ~40 binades below its
    maximum (the e4m3 subnormal grid, zeros of both signs, bf16 denormals): bit-exact with the
    reference, and every scale a power of two."""
    g = torch.Generator().manual_seed(5)
    D, n = 64, 48
    maxima = [2.0 ** e for e in range(-132, 127, 6)] + [1.75 * 2.0 ** 8, 1.7500001 * 2.0 ** 8,
                                                          3.0e38, 1e-38]
    fmax = torch.finfo(dtype).max
    rows = []
    for amax in [a for a in maxima if a <= fmax]:
        for _ in range(2):
            mag = torch.exp2(-torch.rand(D, generator=g) * 40) * amax
            sign = torch.where(torch.rand(D, generator=g) < 0.5, -1.0, 1.0)
            r = (mag * sign).to(torch.float64)
            r[0] = amax
            r[1:3] = 0.0
            r[2] = -0.0
            rows.append(r)
    x = torch.stack(rows).float()  # [n_groups, D]
    x[:, 3] = torch.tensor(9.2e-41)  # a bf16/fp32 denormal in every group (0 for fp16)
    x = x.to(dtype)
    groups = x.shape[0]
    # one token per block, one head: each row is its own (block, head) group
    caches = [x.view(groups, 1, 1, 1, D).expand(groups, 2, 1, 1, D).contiguous()]
    t = torch.randperm(groups, generator=g).to(torch.int32)
    buf = ops.kv_pack(caches, t, groups, quant="fp8_e4m3")
    assert torch.equal(buf, ref.kv_pack(caches, t, groups, quant="fp8_e4m3"))
    sc = buf[-2 * groups * 4:].clone().view(torch.float32)  # the scales end the buffer
    assert (sc > 0).sum() >= 2 * 2 * 7 and torch.isfinite(sc).all()
    m, _ = torch.frexp(sc[sc > 0])
    assert (m == 0.5).all()


# ---- compact ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["accepted_path", "identity", "backwards", "shuffled_overlap",
                                  "duplicates", "empty"])
def test_compact_matches_reference(layout, dtype, kind):
    bs, T = 8, 60
    caches = make_caches(3, 10, bs, 2, 32, dtype, layout, seed=31)
    table = random_table(T, bs, 10, seed=4)
    rng = random.Random(hash(kind) % 1000)
    if kind == "accepted_path":  # tree nodes after a 40-token prefix, accepted ones increasing
        src, dst = sorted(rng.sample(range(40, 60), 7)), 40
    elif kind == "identity":
        src, dst = list(range(20, 30)), 20
    elif kind == "backwards":  # destinations after the sources, overlapping
        src, dst = list(range(10, 25)), 15
    elif kind == "shuffled_overlap":
        src, dst = rng.sample(range(30, 50), 16), 33
    elif kind == "duplicates":
        src, dst = [45, 45, 41, 50, 41], 42
    else:
        src, dst = [], 12
    src_t = torch.tensor(src, dtype=torch.int64)
    want = [c.clone() for c in caches]
    ref.kv_compact(want, table, src_t, dst, layout=layout)
    before = tokens_of(caches, table, T, layout)
    ops.kv_compact(caches, table, src_t.to(torch.int32), dst, layout=layout)
    for a, b in zip(caches, want):
        assert torch.equal(a, b)
    if src:
        assert torch.equal(tokens_of(caches, table, T, layout)[:, :, dst:dst + len(src)],
                           before[:, :, src_t])


# ---- opcheck / torch.compile ------------------------------------------------------------------


def _opcheck_inputs():
    caches = make_caches(2, 6, 8, 2, 32, torch.bfloat16, seed=41)
    table = random_table(20, 8, 6, seed=1)
    return caches, table


@pytest.mark.parametrize("quant", ["none", "int8", "fp8_e4m3"])
def test_opcheck_pack(quant):
    caches, table = _opcheck_inputs()
    torch.library.opcheck(torch.ops.disagg.kv_pack.default,
                          (caches, table, 20, 0, -1, 1, 2, quant, "NHD"))
    n = ops.kv_pack_nbytes(2, 20, 1, 32, torch.bfloat16, quant, 8)
    torch.library.opcheck(torch.ops.disagg.kv_pack_into.default,
                          (caches, table, 20, torch.empty(n, dtype=torch.uint8), 0, -1, 1, 2,
                           quant, "NHD"))


def test_opcheck_unpack_and_compact():
    caches, table = _opcheck_inputs()
    buf = ops.kv_pack(caches, table, 20, quant="int8")
    dst = make_caches(2, 4, 16, 2, 32, torch.float16, "HND", seed=2)
    torch.library.opcheck(torch.ops.disagg.kv_unpack.default,
                          (buf, dst, random_table(20, 16, 4), 0, 0, "HND"))
    torch.library.opcheck(torch.ops.disagg.kv_compact.default,
                          (caches, table, torch.tensor([12, 15, 19]), 10, "NHD"))


def test_torch_compile_fullgraph():
    caches, table = _opcheck_inputs()
    dst = make_caches(2, 6, 8, 2, 32, torch.float32, seed=3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def transfer(src_caches, dst_caches, st, dt, src_pos):
        buf = torch.ops.disagg.kv_pack(src_caches, st, 20, 0, -1, 0, -1, "fp8_e4m3", "NHD")
        torch.ops.disagg.kv_unpack(buf, dst_caches, dt, 0, 0, "NHD")
        torch.ops.disagg.kv_compact(dst_caches, dt, src_pos, 4, "NHD")
        out = torch.empty(buf.numel(), dtype=torch.uint8)
        torch.ops.disagg.kv_pack_into(dst_caches, dt, 20, out, 0, -1, 0, -1, "fp8_e4m3", "NHD")
        return buf, out

    pos = torch.tensor([7, 9, 12])
    buf, out = transfer(caches, dst, table, table, pos)
    want = [c.clone() for c in make_caches(2, 6, 8, 2, 32, torch.float32, seed=3)]
    ref.kv_unpack(ref.kv_pack(caches, table, 20, quant="fp8_e4m3"), want, table)
    ref.kv_compact(want, table, pos, 4)
    assert torch.equal(buf, ops.kv_pack(caches, table, 20, quant="fp8_e4m3"))
    assert all(torch.equal(a, b) for a, b in zip(dst, want))
    assert torch.equal(out, ref.kv_pack(want, table, 20, quant="fp8_e4m3"))


# ---- bad inputs -------------------------------------------------------------------------------


def test_bad_inputs_pack():
    caches, table = _opcheck_inputs()
    with pytest.raises(ValueError, match=r"block_table\[1\] = 6 is out of range"):
        ops.kv_pack(caches, torch.tensor([0, 6, 1], dtype=torch.int32), 20)
    with pytest.raises(ValueError, match=r"block_table\[0\] = -1"):
        ops.kv_pack(caches, torch.tensor([-1, 2, 3]), 20)
    with pytest.raises(ValueError, match="block_table has 2 entries but num_tokens needs 3"):
        ops.kv_pack(caches, table[:2], 20)
    with pytest.raises(ValueError, match="block_table must be int32 or int64"):
        ops.kv_pack(caches, table.float(), 20)
    with pytest.raises(ValueError, match="caches\\[1\\] has dtype"):
        ops.kv_pack([caches[0], caches[1].float()], table, 20)
    with pytest.raises(ValueError, match="caches\\[1\\] has shape"):
        ops.kv_pack([caches[0], caches[1][:5]], table, 20)
    with pytest.raises(ValueError, match="caches\\[0\\] must be 5-D"):
        ops.kv_pack([caches[0][0]], table, 20)
    with pytest.raises(ValueError, match="caches\\[0\\] must be float32"):
        ops.kv_pack([caches[0].to(torch.int16)], table, 20)
    with pytest.raises(ValueError, match="dim 1 must be 2"):
        ops.kv_pack([caches[0][:, :1]], table, 20)
    with pytest.raises(ValueError, match="caches must hold at least one layer"):
        ops.kv_pack([], table, 20)
    with pytest.raises(ValueError, match="layer range"):
        ops.kv_pack(caches, table, 20, layer_start=1, layer_end=3)
    with pytest.raises(ValueError, match="head range"):
        ops.kv_pack(caches, table, 20, head_start=2)
    with pytest.raises(ValueError, match="num_tokens"):
        ops.kv_pack(caches, table, -1)
    with pytest.raises(ValueError, match="quant must be one of"):
        ops.kv_pack(caches, table, 20, quant="int4")
    with pytest.raises(ValueError, match="layout must be"):
        ops.kv_pack(caches, table, 20, layout="NDH")
    with pytest.raises(ValueError, match="out has 10 bytes"):
        ops.kv_pack_into(caches, table, 20, torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out must be"):
        ops.kv_pack_into(caches, table, 20, torch.empty(10000, dtype=torch.int8))


def test_bad_inputs_unpack():
    caches, table = _opcheck_inputs()
    buf = ops.kv_pack(caches, table, 20)
    dst = make_caches(2, 6, 8, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="shorter than the size its header declares"):
        ops.kv_unpack(buf[:-1].clone(), dst, table)
    with pytest.raises(ValueError, match="smaller than the 64-byte header"):
        ops.kv_unpack(buf[:10].clone(), dst, table)
    bad = buf.clone()
    bad[0] ^= 0xFF
    with pytest.raises(ValueError, match="magic"):
        ops.kv_unpack(bad, dst, table)
    bad = buf.clone()
    bad[16] += 1  # num_tokens no longer matches the declared sizes
    with pytest.raises(ValueError, match="corrupted header"):
        ops.kv_unpack(bad, dst, table)
    bad = buf.clone()
    bad[4] = 9  # version
    with pytest.raises(ValueError, match="version"):
        ops.kv_unpack(bad, dst, table)
    with pytest.raises(ValueError, match="buffer must be"):
        ops.kv_unpack(buf.view(torch.int8), dst, table)
    with pytest.raises(ValueError, match="head_dim 32 but caches have head_dim 64"):
        ops.kv_unpack(buf, make_caches(2, 6, 8, 2, 64), table)
    with pytest.raises(ValueError, match="head_start=1 places"):
        ops.kv_unpack(buf, dst, table, head_start=1)
    with pytest.raises(ValueError, match="layer_start=1 places"):
        ops.kv_unpack(buf, dst, table, layer_start=1)
    with pytest.raises(ValueError, match=r"block_table\[2\] = 99"):
        ops.kv_unpack(buf, dst, torch.tensor([0, 1, 99]))
    with pytest.raises(ValueError, match="block_table has 2 entries"):
        ops.kv_unpack(buf, dst, table[:2])
    # nothing was written by any of the failed calls
    assert all(torch.equal(a, b) for a, b in zip(dst, make_caches(2, 6, 8, 2, 32, torch.float32)))


def test_bad_inputs_compact():
    caches, table = _opcheck_inputs()
    with pytest.raises(ValueError, match=r"src_positions\[1\] = 24 is outside"):
        ops.kv_compact(caches, table, torch.tensor([3, 24]), 0)
    with pytest.raises(ValueError, match=r"src_positions\[0\] = -1"):
        ops.kv_compact(caches, table, torch.tensor([-1]), 0)
    with pytest.raises(ValueError, match="dst_start=23"):
        ops.kv_compact(caches, table, torch.tensor([1, 2]), 23)
    with pytest.raises(ValueError, match=r"block_table\[0\] = 7"):
        ops.kv_compact(caches, torch.tensor([7, 1, 2]), torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="src_positions must be int32 or int64"):
        ops.kv_compact(caches, table, torch.tensor([1.0]), 0)


# ---- through the cache manager ----------------------------------------------------------------


def test_manager_transfer_between_different_caches():
    from disagg.kv import OutOfBlocksError, PagedKVCache

    a = PagedKVCache(4, 32, 16, 4, 32, dtype=torch.bfloat16)
    b = PagedKVCache(4, 64, 8, 8, 32, dtype=torch.float32, layout="HND")
    a.allocate("x", 3)
    a.allocate("r", 45)
    for layer in range(4):
        k, v = torch.randn(45, 4, 32), torch.randn(45, 4, 32)
        a.write(layer, "r", 0, k, v)
    staging = torch.empty(a.pack_nbytes("r") + 64, dtype=torch.uint8)
    packed = a.pack("r", out=staging)
    assert packed.numel() == a.pack_nbytes("r") and torch.equal(packed, a.pack("r"))
    b.unpack("r", packed, head_start=4)  # into heads 4..7
    assert b.num_tokens("r") == 45
    for layer in range(4):
        ka, va = a.gather(layer, "r")
        kb, vb = b.gather(layer, "r")
        assert torch.equal(kb[:, 4:], ka.float()) and torch.equal(vb[:, 4:], va.float())
    b.check_invariants()
    # layer by layer into an existing request, and a quantized pack
    for layer in range(4):
        b.unpack("r", a.pack("r", layers=layer, quant="int8"))
    kq, _ = b.gather(3, "r")
    ka, _ = a.gather(3, "r")
    assert (kq[:, :4] - ka.float()).abs().max() <= ka.float().abs().max() / 254 * 1.001
    # a request that does not fit is refused without side effects
    small = PagedKVCache(4, 2, 16, 4, 32, dtype=torch.bfloat16)
    with pytest.raises(OutOfBlocksError):
        small.unpack("r", a.pack("r"))
    assert not small.has("r") and small.num_free_blocks == 2


def test_manager_compact_after_speculation():
    from disagg.kv import PagedKVCache

    c = PagedKVCache(2, 16, 4, 2, 32)
    c.allocate("p", 10)
    c.fork("p", "q")  # q shares p's blocks: compaction must copy-on-write them
    c.append("q", 6)  # 6 draft tree nodes at positions 10..15
    for layer in range(2):
        c.write(layer, "q", 0, torch.randn(16, 2, 32), torch.randn(16, 2, 32))
    kp_before = c.gather(0, "p")[0].clone()
    k_before = c.gather(0, "q")[0].clone()
    c.compact("q", [11, 13, 15], 9)  # overwrites position 9, shared with p until copied
    assert c.num_tokens("q") == 12
    k_after = c.gather(0, "q")[0]
    assert torch.equal(k_after[9:12], k_before[[11, 13, 15]])
    assert torch.equal(k_after[:9], k_before[:9])
    assert torch.equal(c.gather(0, "p")[0], kp_before)
    c.check_invariants()
