"""The fused Triton kernels against the naive references, on CPU tensors through Triton's interpreter, or
compiled for real on CUDA with EFFICIENT_ATTENTION_POP_DEVICE=cuda (``gpu-report`` sets it): then the calls
under test run on the GPU (``on_device``), the interpreter is not forced, and the large-shape tests run too.

Triton decides when ``triton`` is first imported, and when each ``@triton.jit`` kernel is decorated,
whether it interprets. So TRITON_INTERPRET=1 is set here before anything imports triton or the kernel
modules, then put back as it was: the other test modules must not see it (with it, "auto" would send
their CPU region-masked calls to masked_triton). The ``interpreter`` fixture sets it again for each test
here, since the backends read it on every call.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from helpers import DEVICE, assert_close, comfy_inputs, from_heads, on_device, to_heads

ON_CPU = DEVICE.type == "cpu"
_previous_interpret = os.environ.get("TRITON_INTERPRET")
if ON_CPU:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")
    from efficient_attention_pop.kernels import triton_support

    cpu_reasons = triton_support.device_reasons(torch.device("cpu"))  # e.g. triton imported earlier, compiled
    if cpu_reasons and ON_CPU:
        pytest.skip("; ".join(cpu_reasons), allow_module_level=True)
    from efficient_attention_pop.kernels import linear_triton_kernels, masked_triton_kernels  # noqa: F401 (decorate)
finally:
    if _previous_interpret is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous_interpret

from efficient_attention_pop.attention import (BACKENDS, BackendNotSupported, RegionMask, attention, availability,
                                               explain, merge_heads)
from efficient_attention_pop.attention.naive import naive_attention, naive_linear_attention
from efficient_attention_pop.kernels.masked_triton import INTERPRETER_LAUNCH, flash_launch, visible_key_blocks
from efficient_attention_pop.kernels.triton_support import padded_dim

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
BLOCK_N, BLOCK_M = INTERPRETER_LAUNCH.block_n, INTERPRETER_LAUNCH.block_m
attention = on_device(attention)  # on CUDA: inputs moved there, results back to the CPU references
cpu_only = pytest.mark.skipif(not ON_CPU, reason="checks the CPU / interpreter side")
cuda_only = pytest.mark.skipif(ON_CPU, reason="large shapes: run with EFFICIENT_ATTENTION_POP_DEVICE=cuda")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def masked_blocks(dim: int, dtype) -> tuple:
    """(BLOCK_N, BLOCK_M) that masked_triton launches with for head dim ``dim`` on DEVICE."""
    if ON_CPU:
        return BLOCK_N, BLOCK_M
    launch = flash_launch(padded_dim(dim), padded_dim(dim), torch.tensor([], dtype=dtype).element_size(),
                          triton_support.shared_memory_per_program(DEVICE))
    return launch.block_n, launch.block_m


def heads_of(*tensors, heads):
    return [to_heads(t, heads) for t in tensors]


def dense_allowed(mask_bool: torch.Tensor) -> torch.Tensor:
    """(B|1, M) key-padding booleans -> (B|1, 1, 1, M) for the naive references."""
    return mask_bool[:, None, None, :]


# ---------------------------------------------------------------------------------------------- linear_triton

# (batch, heads, n, m, dim, dim_v, dtype, scale): N and M are no multiples of the blocks; D = 64 and 80
# split phase 1 over two programs and phase 2 into chunks.
LINEAR_CASES = [
    (2, 2, 37, 45, 40, 40, FP32, None),
    (1, 3, 50, 33, 64, 32, BF16, None),
    (2, 1, 20, 70, 80, 80, FP16, 0.125),
    (1, 2, 33, 29, 128, 128, FP32, None),
    (1, 1, 17, 40, 32, 64, BF16, 2.0),
]


@pytest.mark.parametrize("batch, heads, n, m, dim, dim_v, dtype, scale", LINEAR_CASES)
def test_linear_triton_matches_naive(batch, heads, n, m, dim, dim_v, dtype, scale):
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, dtype, seed=n + m)
    out = attention(q, k, v, heads, backend="linear_triton", scale=scale)
    assert out.dtype == dtype and out.shape == (batch, n, heads * dim_v)
    expected = from_heads(naive_linear_attention(*heads_of(q, k, v, heads=heads), scale=scale))
    assert_close(out, expected, dtype, "linear_triton vs naive")


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("dim", [32, 40, 64, 80, 128])
@pytest.mark.parametrize("backend", ["linear_triton", "masked_triton"])
def test_kernels_every_head_dim_and_dtype(backend, dim, dtype):
    q, k, v = comfy_inputs(1, 19, 23, 2, dim, dim, dtype, seed=dim)
    qh, kh, vh = heads_of(q, k, v, heads=2)
    expected = naive_linear_attention(qh, kh, vh) if backend == "linear_triton" else naive_attention(qh, kh, vh)
    assert_close(attention(q, k, v, 2, backend=backend), from_heads(expected), dtype, f"{backend} D={dim}")


def test_linear_triton_writes_comfy_layout_without_copy():
    q, k, v = comfy_inputs(2, 19, 23, 3, 32, 32, FP16)
    out = attention(q, k, v, 3, backend="linear_triton", skip_output_reshape=True)  # (B, H, N, Dv) view
    assert out.shape == (2, 3, 19, 32) and out.transpose(1, 2).is_contiguous()
    assert merge_heads(out).data_ptr() == out.data_ptr()  # (B, N, H*Dv) is a view: no transpose copy


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_linear_triton_key_padding_masks(dtype):
    batch, heads, n, m, dim = 3, 2, 21, 39, 40
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim, dtype, seed=5)
    keep = torch.rand(batch, m, generator=torch.Generator().manual_seed(1)) < 0.6
    keep[1] = False  # every key of batch 1 masked: its output is zero
    expected = from_heads(naive_linear_attention(*heads_of(q, k, v, heads=heads), allowed=dense_allowed(keep)))
    additive = torch.zeros(batch, 1, 1, m).masked_fill(~keep[:, None, None], float("-inf"))
    for mask in (keep[:, None, :], additive):
        out = attention(q, k, v, heads, mask, backend="linear_triton")
        assert_close(out, expected, dtype, f"key padding {mask.dtype}")
        assert (out[1] == 0).all()
    shared = keep[2:3, None, :]  # one mask for the whole batch
    expected_shared = naive_linear_attention(*heads_of(q, k, v, heads=heads), allowed=dense_allowed(keep[2:3]))
    assert_close(attention(q, k, v, heads, shared, backend="linear_triton"), from_heads(expected_shared), dtype, "B=1")


def test_linear_triton_refuses_what_it_cannot_fuse():
    q, k, v = comfy_inputs(2, 4, 5, 2, 8, 8)
    cases = [
        (dict(is_causal=True), "is_causal is not supported"),
        (dict(mask=torch.ones(2, 4, 5, dtype=torch.bool)), "not a key-padding mask"),
        (dict(mask=RegionMask(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))),
         "region masks are not fused"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(BackendNotSupported, match=fragment):
            attention(q, k, v, 2, backend="linear_triton", **kwargs)
    kv = torch.randn(2, 5, 8)
    with pytest.raises(BackendNotSupported, match="grouped-query attention"):
        attention(q, kv, kv, 2, backend="linear_triton", enable_gqa=True)


# ---------------------------------------------------------------------------------------------- masked_triton

MASKED_CASES = [
    (2, 2, 37, 45, 40, 40, FP32),
    (1, 2, 33, 18, 64, 64, BF16),
    (1, 1, 20, 29, 80, 32, FP16),
    (1, 1, 17, 35, 128, 128, FP32),
    (2, 1, 9, 21, 32, 80, BF16),
]


@pytest.mark.parametrize("batch, heads, n, m, dim, dim_v, dtype", MASKED_CASES)
def test_masked_triton_unmasked_matches_naive(batch, heads, n, m, dim, dim_v, dtype):
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim_v, dtype, seed=n * m)
    out = attention(q, k, v, heads, backend="masked_triton")
    assert out.dtype == dtype and out.shape == (batch, n, heads * dim_v)
    assert_close(out, from_heads(naive_attention(*heads_of(q, k, v, heads=heads))), dtype, "masked_triton vs naive")


def region_reference(q, k, v, heads, region, scale=None):
    return from_heads(naive_attention(*heads_of(q, k, v, heads=heads), region.to_dense(), scale=scale))


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("label_batch", ["shared", "per_batch", "mixed"])
def test_masked_triton_region_labels(dtype, label_batch):
    batch, heads, n, m, dim = 2, 2, 35, 41, 40
    q, k, v = comfy_inputs(batch, n, m, heads, dim, dim, dtype, seed=3)
    gen = torch.Generator().manual_seed(11)
    query_labels = torch.randint(0, 3, (batch, n), generator=gen)
    key_labels = torch.randint(0, 3, (batch, m), generator=gen)
    query_labels[:, :4] = -1  # these queries see every key
    query_labels[:, 4:7] = 5  # no key carries label 5 and no key is -1: zero rows
    if label_batch == "shared":
        region = RegionMask(query_labels[:1], key_labels[:1])
    elif label_batch == "per_batch":
        region = RegionMask(query_labels, key_labels)
    else:
        region = RegionMask(query_labels[:1], key_labels)
    out = attention(q, k, v, heads, region, backend="masked_triton", scale=0.3)
    assert_close(out, region_reference(q, k, v, heads, region, scale=0.3), dtype, f"region {label_batch}")
    assert (out[:, 4:7] == 0).all()


def test_masked_triton_everywhere_keys_reach_every_query():
    q, k, v = comfy_inputs(1, 30, 40, 1, 32, 32, FP32, seed=4)
    query_labels = torch.arange(30)[None] % 4
    key_labels = torch.full((1, 40), 9)
    key_labels[0, 33:36] = -1  # the only keys any labelled query may see, all in the last key block
    region = RegionMask(query_labels, key_labels)
    out = attention(q, k, v, 1, region, backend="masked_triton")
    assert_close(out, region_reference(q, k, v, 1, region), FP32, "-1 keys")


def sorted_regions(lengths):
    return torch.cat([torch.full((length,), label) for label, length in enumerate(lengths)])[None]


def test_block_table_skips_blocks_of_sorted_regions():
    query_labels = sorted_regions([16, 16, 32, 16])  # aligned with BLOCK_N: one label per query block
    key_labels = sorted_regions([20, 12, 30, 18])  # not aligned with BLOCK_M
    key_blocks, counts = visible_key_blocks(query_labels, key_labels, BLOCK_N, BLOCK_M)
    assert key_blocks.shape == (1, 5, 5) and counts.tolist() == [[2, 1, 2, 2, 2]]
    assert [key_blocks[0, i, :c].tolist() for i, c in enumerate(counts[0].tolist())] == [
        [0, 1], [1], [2, 3], [2, 3], [3, 4]]


@pytest.mark.parametrize("seed", range(3))
def test_block_table_never_skips_a_needed_block(seed):
    """100 labels hash into 64 bins, so unrelated blocks may share a bin: visited, never skipped wrongly."""
    gen = torch.Generator().manual_seed(seed)
    n, m = 70, 90
    query_labels = torch.randint(-1, 100, (2, n), generator=gen)  # 100 labels: hash bins collide
    key_labels = torch.randint(-1, 100, (1, m), generator=gen)
    query_labels[0, :40] = 7
    key_labels[0, 50:] = 3
    key_blocks, counts = visible_key_blocks(query_labels, key_labels, BLOCK_N, BLOCK_M)
    allowed = RegionMask(query_labels, key_labels).to_dense()[:, 0]  # (2, N, M), fine for this small check
    pad = (0, -m % BLOCK_M, 0, -n % BLOCK_N)
    needed = torch.nn.functional.pad(allowed, pad).unflatten(1, (-1, BLOCK_N)).unflatten(3, (-1, BLOCK_M)).any(4).any(2)
    for b in range(2):
        for query_block in range(needed.shape[1]):
            visited = set(key_blocks[b, query_block, :counts[b, query_block]].tolist())
            assert set(needed[b, query_block].nonzero().flatten().tolist()) <= visited
    q, k, v = comfy_inputs(2, n, m, 1, 32, 32, FP32, seed=seed)
    region = RegionMask(query_labels, key_labels)
    assert_close(attention(q, k, v, 1, region, backend="masked_triton"), region_reference(q, k, v, 1, region), FP32,
                 "many labels")


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_masked_triton_skips_blocks_and_stays_exact(dtype):
    """Keys of label 3 fill whole key blocks that no query may see: their v is NaN, so visiting one
    would poison the output; the kernel must skip them and still match the reference."""
    heads, dim = 2, 32
    block_n, block_m = masked_blocks(dim, dtype)
    unit = block_m // 16
    query_labels = sorted_regions([20 * unit, 25 * unit, 19 * unit])  # labels 0, 1, 2
    key_labels = sorted_regions([block_m + 2, block_m - 2, block_m, 3 * block_m])  # label 3 fills key blocks 3 to 5
    n, m = query_labels.shape[1], key_labels.shape[1]
    q, k, v = comfy_inputs(2, n, m, heads, dim, dim, dtype, seed=8)
    v[:, 3 * block_m:] = float("nan")
    region = RegionMask(query_labels, key_labels)
    _, counts = visible_key_blocks(query_labels, key_labels, block_n, block_m)
    assert counts.max() < -(-m // block_m)  # some key blocks are skipped for every query block
    out = attention(q, k, v, heads, region, backend="masked_triton")
    v_seen = v.clone()
    v_seen[:, 3 * block_m:] = 0.0  # never attended: the reference gives them weight 0 (and 0 * NaN = NaN)
    assert_close(out, region_reference(q, k, v_seen, heads, region), dtype, "skipped blocks")


def strided_inputs():
    """(B, H, N, D) q with stride 1 on H (a permuted (B, D, N, H) buffer), k and v slices of one tensor, on DEVICE."""
    q = torch.randn(2, 40, 25, 3, device=DEVICE).permute(0, 3, 2, 1)
    kv = torch.randn(2, 3, 31, 80, device=DEVICE)
    return q, kv[..., :40], kv[..., 40:]


def test_masked_triton_strided_split_heads():
    """skip_reshape inputs with arbitrary strides, made on the device (moving them would make them contiguous)."""
    q, k, v = strided_inputs()
    region = RegionMask(torch.randint(-1, 2, (1, 25)), torch.randint(-1, 2, (2, 31)))
    out = attention(q, k, v, 3, region, backend="masked_triton", skip_reshape=True, skip_output_reshape=True)
    assert_close(out, naive_attention(q.cpu(), k.cpu(), v.cpu(), region.to_dense()), FP32, "strided")


def test_linear_triton_strided_split_heads():
    q, k, v = strided_inputs()
    key_bias = torch.zeros(2, 31).masked_fill(torch.rand(2, 31, generator=torch.Generator().manual_seed(2)) < 0.3,
                                              float("-inf"))
    out = attention(q, k, v, 3, key_bias[:, None, None], backend="linear_triton", skip_reshape=True,
                    skip_output_reshape=True)
    expected = naive_linear_attention(q.cpu(), k.cpu(), v.cpu(), allowed=dense_allowed(key_bias == 0))
    assert_close(out, expected, FP32, "strided linear")


@pytest.mark.parametrize("backend", ["masked_triton", "linear_triton"])
def test_grids_beyond_the_y_axis_limit_are_split(backend, monkeypatch):
    """batch * heads above CUDA's 65535 programs on a grid's y axis: the launchers split the batch. Here the
    limit is lowered to 4 programs, so 5 batches of 3 heads take 5 launches; a part left out stays garbage."""
    from efficient_attention_pop.kernels import linear_triton, masked_triton

    monkeypatch.setattr(triton_support, "MAX_GRID_Y", 4)
    assert triton_support.batch_parts(5, 3) == [slice(i, i + 1) for i in range(5)]
    assert triton_support.batch_parts(7, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]
    grids = []
    module_name, kernel_name = (("masked_triton_kernels", "region_attention_kernel") if backend == "masked_triton"
                                else ("linear_triton_kernels", "linear_output_kernel"))
    kernels = triton_support.load_kernels(module_name)
    kernel = getattr(kernels, kernel_name)
    interpreted = triton_support.runs_interpreted(kernel)
    monkeypatch.setattr(kernels, kernel_name, GridRecorder(kernel, grids))
    for module in (masked_triton, linear_triton):
        monkeypatch.setattr(module, "runs_interpreted", lambda _kernel: interpreted)
    q, k, v = comfy_inputs(5, 21, 19, 3, 32, 32, FP32, seed=9)
    qh, kh, vh = heads_of(q, k, v, heads=3)
    if backend == "linear_triton":
        expected = naive_linear_attention(qh, kh, vh)
        assert_close(attention(q, k, v, 3, backend=backend), from_heads(expected), FP32, "split linear")
        assert [grid[1] for grid in grids] == [3] * 5, grids
        return
    for label_batch in (1, 5):
        gen = torch.Generator().manual_seed(label_batch)
        region = RegionMask(torch.randint(-1, 3, (label_batch, 21), generator=gen),
                            torch.randint(-1, 3, (5, 19), generator=gen))
        assert_close(attention(q, k, v, 3, region, backend=backend), region_reference(q, k, v, 3, region), FP32,
                     f"split region, label batch {label_batch}")
    assert_close(attention(q, k, v, 3, backend=backend), from_heads(naive_attention(qh, kh, vh)), FP32, "split")
    assert [grid[1] for grid in grids] == [3] * 15, grids  # 3 calls, each 5 launches of one batch's 3 heads


class GridRecorder:
    """A kernel stand-in that records each launch grid and launches the real kernel."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("capability, shared_memory", [((7, 5), 65536), ((8, 0), 166912), ((8, 6), 101376),
                                                        ((8, 9), 101376), ((9, 0), 232448)])
@pytest.mark.parametrize("element_size", [2, 4])
def test_flash_tiles_fit_every_gpus_shared_memory(capability, shared_memory, element_size):
    """masked_triton's tile choice from its own constants: q block + k and v blocks per stage within the share
    of the device's shared memory it budgets, for every head dim it serves (a tile that does not fit fails to
    launch on that GPU: "out of resource: shared memory"), with the largest tile where it fits."""
    from efficient_attention_pop.kernels import masked_triton

    budget = masked_triton.SHARED_MEMORY_SHARE * shared_memory
    dtype = FP32 if element_size == 4 else FP16
    for dim in (32, 40, 64, 80, 96, 128, 160, 256):
        pad = padded_dim(dim)
        launch = flash_launch(pad, pad, element_size, shared_memory)
        reason = masked_triton.tile_reason(dim, dim, dtype, shared_memory)
        if launch is None:  # then even the smallest tile is too big, and the backend refuses (auto takes masked)
            block_n, block_m, stages = masked_triton.FLASH_TILES[-1]
            assert (block_n * pad + stages * block_m * 2 * pad) * element_size > budget
            assert reason and f"D={dim}" in reason and f"{shared_memory // 1024} KB" in reason
            continue
        assert reason is None
        tile = (launch.block_n * pad + launch.num_stages * launch.block_m * 2 * pad) * element_size
        assert tile <= budget, (capability, dim, element_size, launch)
        assert launch.block_n >= 16 and launch.block_m >= 16 and launch.num_warps in (4, 8)
    assert flash_launch(64, 64, 2, 232448).block_n == 128  # H100: the largest tile for SD-sized heads
    assert flash_launch(128, 128, 2, 101376) is not None  # Flux heads in bf16 on a 99 KB consumer GPU


def test_masked_triton_refuses_with_reasons():
    q, k, v = comfy_inputs(2, 4, 5, 2, 8, 8)
    with pytest.raises(BackendNotSupported, match="dense masks are not supported"):
        attention(q, k, v, 2, torch.ones(2, 4, 5, dtype=torch.bool), backend="masked_triton")
    with pytest.raises(BackendNotSupported, match="is_causal is not supported"):
        attention(q, k, v, 2, backend="masked_triton", is_causal=True)
    kv = torch.randn(2, 5, 8)
    with pytest.raises(BackendNotSupported, match="grouped-query attention"):
        attention(q, kv, kv, 2, backend="masked_triton", enable_gqa=True)
    wide = torch.randn(1, 4, 300)
    with pytest.raises(BackendNotSupported, match="head dims above 256"):
        attention(wide, wide, wide, 1, backend="masked_triton")
    trained = q.clone().requires_grad_()
    for backend in ("masked_triton", "linear_triton"):
        with pytest.raises(BackendNotSupported, match="no backward pass"):
            attention(trained, k, v, 2, backend=backend)
    with torch.no_grad():
        attention(trained, k, v, 2, backend="masked_triton")


# ---------------------------------------------------------------------------------- dispatch and availability

@cpu_only
def test_explain_on_cpu_names_masked_triton(monkeypatch):
    q, k, v = comfy_inputs(2, 4, 5, 2, 8, 8)
    region = RegionMask(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    interpreted = explain(q, k, v, 2, region)
    assert interpreted.chosen == "masked_triton"
    assert "region masks" in interpreted.passed_over["sdpa"][0]
    assert interpreted.passed_over["masked"] == ["lower priority than masked_triton"]
    assert explain(q, k, v, 2).chosen == "sdpa"

    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = explain(q, k, v, 2, region)
    assert compiled.chosen == "masked"
    reasons = " ".join(compiled.passed_over["masked_triton"])
    assert "TRITON_INTERPRET=1" in reasons
    assert "approximate" in compiled.passed_over["linear_triton"][0]


@cpu_only
def test_unavailable_reasons(monkeypatch):
    backend = BACKENDS["masked_triton"]
    assert backend.unavailable_reason() is None  # interpreter requested
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.unavailable_reason() == "needs a CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors)"
    assert availability()["linear_triton"] == backend.unavailable_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, but CPU tensors
    assert backend.unavailable_reason() is None
    q, k, v = comfy_inputs(1, 4, 4, 1, 8, 8)
    with pytest.raises(BackendNotSupported, match="CPU tensors run only through Triton's interpreter"):
        attention(q, k, v, 1, backend="masked_triton")
    monkeypatch.setattr(triton_support, "triton_installed", lambda: False)
    assert backend.unavailable_reason() == "triton is not installed"


def test_pack_imports_and_explains_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # import triton now raises ImportError
        "import torch\n"
        "from efficient_attention_pop.attention import AUTO_PRIORITY, BackendNotSupported, attention, availability\n"
        "assert availability()['masked_triton'] == 'triton is not installed', availability()\n"
        "assert AUTO_PRIORITY == ['sdpa', 'masked_triton', 'masked'], AUTO_PRIORITY\n"
        "q = torch.randn(1, 4, 8)\n"
        "try:\n"
        "    attention(q, q, q, 2, backend='linear_triton')\n"
        "except BackendNotSupported as error:\n"
        "    assert 'not available: triton is not installed' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('linear_triton ran without triton')\n"
        "print(attention(q, q, q, 2).shape)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4, 8])" in result.stdout


# Compiles the GPU path for real (sm_80 and sm_90, with Triton's bundled ptxas) without a GPU: the
# launchers run on CPU tensors, but each kernel launch is replaced by an ahead-of-time compile of the
# same arguments and launch options, which must fit the target's shared memory.
GPU_COMPILE_SCRIPT = r"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from efficient_attention_pop.attention import RegionMask
from efficient_attention_pop.kernels import triton_support
from efficient_attention_pop.kernels.linear_triton import linear_attention_triton
from efficient_attention_pop.kernels.masked_triton import region_attention_triton

ARG_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
             torch.int32: "*i32", float: "fp32", int: "i32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
TARGETS = {80: 166912, 90: 232448}  # compute capability: shared memory per program (A100, H100)


def compile_instead_of_launch(kernel, capability):
    def run(*args, grid, warmup, **kwargs):
        signature = {name: ARG_TYPES[arg.dtype if isinstance(arg, torch.Tensor) else type(arg)]
                     for name, arg in zip(kernel.arg_names, args)}
        constexprs = {name: value for name, value in kwargs.items() if name not in LAUNCH_OPTIONS}
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", capability, 32),
                                  options={name: kwargs[name] for name in LAUNCH_OPTIONS})
        assert compiled.metadata.shared <= TARGETS[capability], (kernel.__name__, capability, compiled.metadata.shared)
        print(kernel.__name__, capability, compiled.metadata.shared)
    kernel.run = run


def split_heads(batch, heads, tokens, dim, dtype):
    return torch.randn(batch, tokens, heads, dim).to(dtype).transpose(1, 2)


linear = triton_support.load_kernels("linear_triton_kernels")
masked = triton_support.load_kernels("masked_triton_kernels")
for capability, shared_memory in TARGETS.items():
    triton_support.shared_memory_per_program = lambda device: shared_memory
    for kernel in (linear.linear_context_kernel, linear.linear_output_kernel, masked.region_attention_kernel):
        compile_instead_of_launch(kernel, capability)
    region = RegionMask(torch.randint(-1, 3, (1, 300)), torch.randint(-1, 3, (2, 200)))
    for dim, dtype in ((128, torch.float16), (80, torch.float32)):
        q, k, v = (split_heads(2, 3, tokens, dim, dtype) for tokens in (300, 200, 200))
        region_attention_triton(q, k, v, region, None)
    q, k, v = (split_heads(2, 3, tokens, 40, torch.bfloat16) for tokens in (300, 200, 200))
    region_attention_triton(q, k, v, None, None)
    linear_attention_triton(q, k, v, torch.zeros(1, 200), None)
"""


@cpu_only
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this triton has no NVIDIA backend to compile with")
def test_gpu_kernels_compile_for_sm80_and_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", GPU_COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("region_attention_kernel") == 6 and result.stdout.count("linear_") == 4


# ------------------------------------------------------------------------- CUDA only: shapes of real models

def _sdpa_reference(q, k, v, heads, dense=None):
    """torch SDPA in fp32 on the device, (B, N, H*D) in and out."""
    qh, kh, vh = (to_heads(t.float(), heads) for t in (q, k, v))
    return from_heads(torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=dense)).cpu()


@cuda_only
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("dim, heads, text", [(128, 4, 512), (40, 8, 0), (64, 10, 77)])
def test_masked_triton_large_shapes(dim, heads, text, dtype):
    """Flux-, SD1.5- and SDXL-like heads with 64x64 image grids (+ text), unmasked and isolate-regions."""
    side = 64
    n = text + side * side
    q, k, v = (t.to(DEVICE) for t in comfy_inputs(1, n, n, heads, dim, dim, dtype, seed=dim))
    assert_close(attention(q, k, v, heads, backend="masked_triton"), _sdpa_reference(q, k, v, heads), dtype, "no mask")
    labels = torch.cat([torch.full((text,), -1), (torch.arange(side * side) % side >= side // 2).long()])[None]
    region = RegionMask(labels, labels)
    out = attention(q, k, v, heads, region, backend="masked_triton")
    dense = region.to_dense().to(DEVICE)
    assert_close(out, _sdpa_reference(q, k, v, heads, dense), dtype, "isolate regions")


@cuda_only
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_linear_triton_large_shapes(dtype):
    """N = 20000 keys and queries (an SD1.5 1024 px level and more) against the PyTorch linear backend in fp32."""
    from efficient_attention_pop.attention import attention as library_attention

    q, k, v = (t.to(DEVICE) for t in comfy_inputs(2, 20000, 20000, 8, 64, 64, dtype, seed=1))
    expected = library_attention(q.float(), k.float(), v.float(), 8, backend="linear").cpu()
    assert_close(attention(q, k, v, 8, backend="linear_triton"), expected, dtype, "N=20000")


@cuda_only
@pytest.mark.parametrize("backend", ["masked_triton", "linear_triton"])
def test_kernels_beyond_65535_batch_heads(backend):
    """batch * heads = 8200 * 8 > 65535 (temporal attention over every pixel of a 64x64 latent, cond and uncond)."""
    from efficient_attention_pop.attention import attention as library_attention

    q, k, v = (t.to(DEVICE) for t in comfy_inputs(8200, 16, 16, 8, 32, 32, FP16, seed=2))
    reference = "linear" if backend == "linear_triton" else "sdpa"
    expected = library_attention(q.float(), k.float(), v.float(), 8, backend=reference).cpu()
    assert_close(attention(q, k, v, 8, backend=backend), expected, FP16, f"{backend} B*H=65600")
