"""Reference append_verify_kv: implements dspark_kernels.append_verify_kv with one index_put_ per cache.

Deterministic and capturable (no host sync, shapes from T alone): rows that
share a slot all write the value of the last of them, so the index_put_ sees
duplicate indices only with identical values (whose result torch defines),
and rows with a slot outside [0, P·S) repeat another row's write instead of
being filtered out (filtering would make the shape depend on values):

1. valid[t] = 0 <= slot[t] < P·S; invalid rows get the key -1 for the sort.
2. A stable sort of the keys puts each slot's rows in row order; the last of
   each run (searchsorted(sorted, sorted, right=True) - 1) is the winner, and
   winner[t] is the winning row of slot[t].
3. Valid rows write key[winner[t]] at slot[t]. Invalid rows write what the
   row with the largest slot writes (itself a winner) when any row is valid,
   else slot 0's own current value back into slot 0.
"""

from __future__ import annotations

import torch


def append_verify_kv(a):
    key, value, k_cache, v_cache = a.key, a.value, a.k_cache, a.v_cache
    rows = key.shape[0]
    num_pages, page_size = k_cache.shape[:2]
    num_slots = num_pages * page_size
    if rows == 0 or num_slots == 0:  # nothing to write, or no slot to write to
        return None
    slot = a.slot_mapping.to(torch.int64)
    valid = (slot >= 0) & (slot < num_slots)
    keys = torch.where(valid, slot, -1)
    ordered, order = torch.sort(keys, stable=True)
    run_end = torch.searchsorted(ordered, ordered, right=True) - 1
    winner = torch.empty_like(order)
    winner[order] = order[run_end]
    # One-element slices, not 0-d indices: indexing with a 0-d tensor would read it on the host.
    last = order[-1:]  # the last row of the largest slot: a winner when any row is valid
    any_valid = ordered[-1:] >= 0
    source = torch.where(valid, winner, last)
    target = torch.where(valid, slot, torch.where(any_valid, slot[last], 0))
    page, offset = target // page_size, target % page_size
    for cache, rows_in in ((k_cache, key), (v_cache, value)):
        new = torch.where(any_valid.view(1, 1, 1), rows_in[source], cache[0, 0])
        cache.index_put_((page, offset), new.to(cache.dtype))
    return None
