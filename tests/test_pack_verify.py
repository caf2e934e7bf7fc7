"""pack_verify: every backend against a plain Python loop on random ragged batches (empty, single,
large; inactive requests with 0 rows) in static buckets of num_rows rows (the default R·(γ+1), exactly
cu_verify[R], more), the engine-safe padding (pad_token, position 0, scratch_slot, row_request -1),
the KV slot mapping through a page table (page sizes 1, 16, 5; vLLM slot_mapping layout), non-contiguous
and int64 inputs, the value checks (num_rows too small, positions past int32, page columns and ids),
the unchecked path's documented clamps (rows past the bucket dropped, positions saturated, bad pages to
the scratch slot), and capturability proxies (opcheck, torch.compile fullgraph, no host sync).
Argument validation: tests/test_validation.py; the checks-off fuzz: tests/test_unchecked.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import pack_verify as op

from host_sync import HostSyncSpy
from support import DEVICE, available_backends, interpreted

BACKENDS = available_backends(op)
INT32_MAX = 2**31 - 1


def loop_pack(anchor, tokens, cu_verify, start_pos, *, num_rows=None, page_table=None, page_size=None,
              scratch_slot=0, pad_token=0):
    """Row cu[r] + j of request r: anchor (j = 0) or draft j - 1, at position p = start_pos[r] + j,
    in slot page_table[r][p // S] * S + p % S; the other rows up to num_rows are padding."""
    num_req, gamma = len(tokens), (len(tokens[0]) if tokens else 0)
    size = num_req * (gamma + 1) if num_rows is None else num_rows
    tok, pos, req = [pad_token] * size, [0] * size, [-1] * size
    slot = [scratch_slot] * size
    for r in range(num_req):
        for j in range(cu_verify[r + 1] - cu_verify[r]):
            t = cu_verify[r] + j
            tok[t] = anchor[r] if j == 0 else tokens[r][j - 1]
            pos[t] = start_pos[r] + j
            req[t] = r
            if page_table is not None:
                slot[t] = page_table[r][pos[t] // page_size] * page_size + pos[t] % page_size
    return tok, pos, req, (slot if page_table is not None else [])


def random_batch(rng: np.random.Generator, num_req: int, gamma: int, *, dtype=torch.int32,
                 inactive_frac: float = 0.2, zero_frac: float = 0.2, vocab: int = 151936):
    lengths = rng.integers(0, gamma + 1, num_req)
    lengths[rng.uniform(size=num_req) < zero_frac] = 0
    active = rng.uniform(size=num_req) >= inactive_frac
    # Inactive requests: 0 rows; their lengths may be anything in range.
    rows = np.where(active, lengths + 1, 0)
    cu = np.zeros(num_req + 1, dtype=np.int64)
    cu[1:] = np.cumsum(rows)
    anchor = rng.integers(0, vocab, num_req)
    tokens = rng.integers(0, vocab, (num_req, gamma))
    start_pos = rng.integers(0, 100_000, num_req)
    t = lambda a: torch.tensor(a, dtype=dtype).reshape(a.shape)  # noqa: E731
    return t(anchor), t(tokens), t(lengths), torch.tensor(cu, dtype=torch.int32), t(start_pos)


def random_pages(rng: np.random.Generator, start_pos, gamma: int, page_size: int, *, dtype=torch.int32):
    """A page table wide enough for every request's positions, its pages a random permutation of the
    cache's pages (the last page owned by nobody: the scratch page). Returns (page_table, num_pages)."""
    num_req = start_pos.shape[0]
    width = (int(start_pos.max()) + gamma) // page_size + 1 if num_req else 1
    num_pages = num_req * width + 1
    perm = rng.permutation(num_pages - 1)[: num_req * width].reshape(num_req, width)
    return torch.tensor(perm, dtype=dtype), num_pages


def run_pack(backend, anchor, tokens, lengths, cu_verify, start_pos, **kw):
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = dk.pack_verify(*(x.to(DEVICE) for x in (anchor, tokens, lengths, cu_verify, start_pos)), **kw,
                         backend=backend)
    assert isinstance(out, dk.VerifyBatch)
    return dk.VerifyBatch(*(o.cpu() for o in out))


def check(backend, anchor, tokens, lengths, cu, start_pos, **kw):
    num_req, gamma = tokens.shape
    got = run_pack(backend, anchor, tokens, lengths, cu, start_pos, **kw)
    loop_kw = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in kw.items() if k != "num_pages"}
    want = loop_pack(anchor.tolist(), tokens.tolist(), cu.tolist(), start_pos.tolist(), **loop_kw)
    size = kw["num_rows"] if kw.get("num_rows") is not None else num_req * (gamma + 1)
    for name, g, w in zip(dk.VerifyBatch._fields, got, want):
        dtype = torch.int64 if name == "slot_mapping" else torch.int32
        shape = (size,) if name != "slot_mapping" or kw.get("page_table") is not None else (0,)
        assert g.dtype == dtype and g.shape == shape, (name, g.dtype, g.shape)
        assert g.tolist() == w, name
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_req", [0, 1, 7, 300])
@pytest.mark.parametrize("gamma", [0, 1, 5, 16])
def test_matches_loop(backend, num_req, gamma):
    rng = np.random.default_rng(num_req * 17 + gamma)
    for trial in range(4 if num_req < 300 else 2):
        dtype = (torch.int32, torch.int64)[trial % 2]
        batch = random_batch(rng, num_req, gamma, dtype=dtype, inactive_frac=(0.0, 0.2, 0.5, 1.0)[trial])
        check(backend, *batch)
        total = int(batch[3][-1]) if num_req else 0
        # The bucket exactly as large as the batch, and larger, with a page table of each page size.
        page_size = (1, 16, 5, 3)[trial]
        page_table, num_pages = random_pages(rng, batch[4], gamma, page_size, dtype=dtype)
        for rows in (total, total + 37):
            check(backend, *batch, num_rows=rows, page_table=page_table, page_size=page_size,
                  num_pages=num_pages if trial % 2 else None,
                  scratch_slot=(num_pages - 1) * page_size + trial % page_size,
                  pad_token=trial * 11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_batch(backend):
    rng = np.random.default_rng(3)
    batch = random_batch(rng, 2048, 16)
    page_table, num_pages = random_pages(rng, batch[4], 16, 16)
    check(backend, *batch, num_rows=40000, page_table=page_table, page_size=16, num_pages=num_pages,
          scratch_slot=(num_pages - 1) * 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_handmade(backend):
    anchor = torch.tensor([10, 20, 30, 40], dtype=torch.int32)
    tokens = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]], dtype=torch.int32)
    lengths = torch.tensor([2, 3, 0, 1], dtype=torch.int32)
    cu = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32)  # request 1 inactive (0 rows)
    start = torch.tensor([100, 200, 300, 6], dtype=torch.int32)
    got = run_pack(backend, anchor, tokens, lengths, cu, start)
    assert got.token_ids.tolist() == [10, 11, 12, 30, 40, 41] + [0] * 10
    assert got.positions.tolist() == [100, 101, 102, 300, 6, 7] + [0] * 10
    assert got.row_request.tolist() == [0, 0, 0, 2, 3, 3] + [-1] * 10
    assert got.slot_mapping.shape == (0,) and got.slot_mapping.dtype == torch.int64
    # Pages of 4 slots, 8 rows in the bucket; only the columns the rows write hold real pages.
    wide = torch.zeros(4, 80, dtype=torch.int32)
    wide[0, 25], wide[2, 75], wide[3, :2] = 7, 5, torch.tensor([2, 9])
    got = run_pack(backend, anchor, tokens, lengths, cu, start, num_rows=8, page_table=wide, page_size=4,
                   num_pages=11, scratch_slot=43, pad_token=3)
    assert got.token_ids.tolist() == [10, 11, 12, 30, 40, 41, 3, 3]
    assert got.positions.tolist() == [100, 101, 102, 300, 6, 7, 0, 0]
    assert got.row_request.tolist() == [0, 0, 0, 2, 3, 3, -1, -1]
    # 100 = 25·4 + 0 -> page 7: 28, 29, 30; 300 = 75·4 -> page 5: 20; 6 = 1·4 + 2 -> page 9: 38, 39.
    assert got.slot_mapping.tolist() == [28, 29, 30, 20, 38, 39, 43, 43]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(8)
    anchor, tokens, lengths, cu, start_pos = random_batch(rng, 9, 5, dtype=torch.int64)
    page_table, num_pages = random_pages(rng, start_pos, 5, 16, dtype=torch.int64)
    pages = dict(page_table=page_table, page_size=16, num_pages=num_pages, scratch_slot=3, num_rows=70)
    wide = torch.zeros(9, 10, dtype=torch.int64)
    wide[:, ::2] = tokens
    strided = wide[:, ::2]  # stride (10, 2)
    transposed = tokens.t().contiguous().t()  # stride (1, 9)
    anchor_strided = torch.stack([anchor, -anchor], dim=1)[:, 0]
    cu_strided = torch.stack([cu, -cu], dim=1)[:, 0]
    pt_transposed = page_table.t().contiguous().t()
    for toks in (strided, transposed):
        assert not toks.is_contiguous()
        got = check(backend, anchor_strided, toks, lengths, cu_strided, start_pos,
                    **dict(pages, page_table=pt_transposed))
        want = run_pack(backend, anchor, tokens, lengths, cu, start_pos, **pages)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_schedule_to_pack():
    """The cu_verify of a schedule (inactive requests included) packs as is."""
    surv = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.5, 0.5], [0.7, 0.7, 0.7], [0.3, 0.2, 0.1]])
    sps = 1.0 / (1.0 + 0.05 * torch.arange(17, dtype=torch.float32))
    active = torch.tensor([True, False, True, True])
    s = dk.schedule_verify(surv, sps, active=active)
    anchor = torch.tensor([1, 2, 3, 4])
    tokens = torch.arange(12).reshape(4, 3) + 100
    start = torch.tensor([5, 6, 7, 8])
    got = check("reference", anchor, tokens, s.lengths, s.cu_verify, start)
    assert int((got.row_request >= 0).sum()) == int(s.total)
    assert 1 not in got.row_request.tolist()  # the inactive request has no rows


# ---------------------------------------------------------------------------
# Value checks (on: CPU default) and the unchecked path's documented clamps
# ---------------------------------------------------------------------------

def _small():
    i32 = dict(dtype=torch.int32)
    return dict(anchor=torch.tensor([1, 2], **i32), tokens=torch.tensor([[3, 4, 5], [6, 7, 8]], **i32),
                lengths=torch.tensor([2, 1], **i32), cu_verify=torch.tensor([0, 3, 5], **i32),
                start_pos=torch.tensor([0, 9], **i32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_checks_name_the_argument(backend, value_checks_on):
    base = _small()
    pages = dict(page_table=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32), page_size=4)
    cases = [
        (dict(num_rows=4), r"^num_rows = 4 is smaller than the batch: cu_verify\[R\] = 5"),
        (dict(start_pos=torch.tensor([0, INT32_MAX - 2], dtype=torch.int32)), r"^start_pos \+ gamma must be < 2\^31"),
        (dict(start_pos=torch.tensor([0, 2**31], dtype=torch.int64)), r"^start_pos \+ gamma must be < 2\^31"),
        (dict(start_pos=torch.tensor([0, -1], dtype=torch.int32)), r"^start_pos must be non-negative"),
        (dict(pages, start_pos=torch.tensor([0, 11], dtype=torch.int32)),  # position 12: column 3 of 3
         r"^page_table has 3 pages per request but request 1 writes position 12, in page column 3"),
        (dict(pages, page_table=torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32)),  # request 1: column 2
         r"^page_table holds page ids outside \[0, 2\^31\)"),
        (dict(pages, num_pages=5), r"^page_table holds page ids outside \[0, 5\) .*max 5"),
        (dict(pages, num_pages=6, scratch_slot=24), r"^scratch_slot must be a slot of the cache"),
        (dict(pages, page_size=None), r"^page_table needs page_size"),
        (dict(page_size=4), r"^page_size needs page_table"),
        (dict(num_pages=4), r"^num_pages needs page_table"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            run_pack(backend, **{**base, **change})
    # Page ids outside the rows' pages are not read: -1 in an unused column is fine.
    run_pack(backend, **base, **dict(pages, page_table=torch.tensor([[0, 1, -1], [-7, 3, 4]], dtype=torch.int32),
                                     num_pages=6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_rows_past_the_bucket_are_dropped(backend):
    """num_rows < cu_verify[R] with checks off: the first num_rows rows of the full batch, nothing more."""
    rng = np.random.default_rng(31)
    batch = random_batch(rng, 6, 4, inactive_frac=0.0)
    page_table, num_pages = random_pages(rng, batch[4], 4, 5)
    pages = dict(page_table=page_table, page_size=5, num_pages=num_pages, scratch_slot=1)
    full = run_pack(backend, *batch, **pages)
    total = int(batch[3][-1])
    dk.set_value_checks(False)
    try:
        for rows in (0, 1, total // 2, total - 1):
            got = run_pack(backend, *batch, num_rows=rows, **pages)
            for g, w in zip(got, full):
                assert torch.equal(g, w[:rows])
    finally:
        dk.set_value_checks(None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_positions_saturate_and_bad_pages_go_to_scratch(backend):
    """Checks off: positions are int64 math saturated to [0, 2^31 - 1]; a page column past the table,
    a negative page id or one >= num_pages gives the scratch slot."""
    anchor = torch.tensor([1, 2, 3, 4])
    tokens = torch.tensor([[5, 6, 7]] * 4)
    lengths = torch.tensor([3, 3, 3, 3])
    cu = torch.tensor([0, 4, 8, 12, 16], dtype=torch.int32)
    start = torch.tensor([INT32_MAX - 1, -5, 2**40, 6], dtype=torch.int64)
    page_table = torch.tensor([[0, 1], [-3, 2], [1, 0], [1, 99]])
    dk.set_value_checks(False)
    try:
        got = run_pack(backend, anchor, tokens, lengths, cu, start, page_table=page_table, page_size=4, num_pages=3,
                       scratch_slot=11)
    finally:
        dk.set_value_checks(None)
    assert got.positions.tolist() == [INT32_MAX - 1, INT32_MAX, INT32_MAX, INT32_MAX, 0, 0, 0, 0,
                                      INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, 6, 7, 8, 9]
    # request 0: column 2^29 - 1 >= 2 -> scratch; request 1: positions clamp to 0, page -3 -> scratch;
    # request 2: column past the table -> scratch; request 3: 6, 7 on page 99 >= num_pages -> scratch,
    # 8, 9 in column 2 >= 2 -> scratch.
    assert got.slot_mapping.tolist() == [11] * 16
    assert got.token_ids.tolist() == [1, 5, 6, 7, 2, 5, 6, 7, 3, 5, 6, 7, 4, 5, 6, 7]
    page_table[3] = torch.tensor([1, 2])
    page_table[1] = torch.tensor([2, 2])
    dk.set_value_checks(False)
    try:
        got = run_pack(backend, anchor, tokens, lengths, cu, start, page_table=page_table, page_size=4, num_pages=4,
                       scratch_slot=15)
    finally:
        dk.set_value_checks(None)
    # request 1: position 0 on page 2 -> 8; request 3: 6, 7 on page 2 -> 10, 11, then column 2 -> scratch.
    assert got.slot_mapping.tolist() == [15] * 4 + [8] * 4 + [15] * 4 + [10, 11, 15, 15]


# ---------------------------------------------------------------------------
# Capturability
# ---------------------------------------------------------------------------

def _opcheck_args(backend, num_req=6, gamma=4, pages=True):
    rng = np.random.default_rng(num_req + gamma)
    batch = [t.to(DEVICE) for t in random_batch(rng, num_req, gamma)]
    if not pages or not num_req:
        return (*batch, None, None, None, None, 0, 0, backend)
    page_table, num_pages = random_pages(rng, batch[4].cpu(), gamma, 5)
    return (*batch, num_req * (gamma + 1) + 3, page_table.to(DEVICE), 5, num_pages, 2, 7, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_req,gamma,pages", [(6, 4, True), (6, 4, False), (1, 0, True), (0, 3, False)])
def test_opcheck(backend, num_req, gamma, pages):
    torch.library.opcheck(torch.ops.dspark.pack_verify.default, _opcheck_args(backend, num_req, gamma, pages))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    rng = np.random.default_rng(21)
    page_table, num_pages = random_pages(rng, torch.tensor([100_000] * 11), 5, 16)
    page_table = page_table.to(DEVICE)

    def step(anchor, tokens, lengths, cu, start_pos):
        return tuple(dk.pack_verify(anchor, tokens, lengths, cu, start_pos, num_rows=80, page_table=page_table,
                                    page_size=16, num_pages=num_pages, scratch_slot=5, backend=backend))

    compiled = torch.compile(step, fullgraph=True)
    for trial in range(3):
        batch = [t.to(DEVICE) for t in random_batch(rng, 11, 5)]
        for g, w in zip(compiled(*batch), step(*batch)):
            assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend):
    """CPU proxy for CUDA-graph capture: the implementation itself (argument
    checks aside) reads no device value on the host."""
    if interpreted(backend):
        pytest.skip("the Triton interpreter copies tensors to the host by design")
    args = _opcheck_args(backend)[:-1]
    with HostSyncSpy() as spy:
        op.OP.run(backend, op.OP.Args(*args))
    assert spy.syncs == [], spy.syncs
