"""Property: whatever the mix of requests, arrivals and aborts, every block comes back and
every request that was not aborted produces exactly its unconstrained output."""

from __future__ import annotations

from fake_runner import expected_output
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scheduler import assert_all_free, make_engine

from tokenmill.protocol import EngineRequest, SamplingParams

# A request: (prompt-prefix family, prompt length, max_new_tokens, arrival step, abort step or -1)
request_st = st.tuples(st.integers(0, 3), st.integers(1, 60), st.integers(1, 24),
                       st.integers(0, 40), st.integers(-1, 60))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(request_st, min_size=25, max_size=25),
       num_blocks=st.integers(18, 80), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(16, 128))
def test_random_requests_and_aborts_leak_nothing(reqs: list[tuple[int, int, int, int, int]],
                                                 num_blocks: int, block_size: int,
                                                 budget: int) -> None:
    # 40 examples x 25 requests = 1,000 random requests per run.
    num_blocks = max(num_blocks, -(-85 // block_size))  # the largest request always fits alone
    core, kv, _ = make_engine(num_blocks=num_blocks, block_size=block_size, budget=budget)
    families = [[f * 100 + i for i in range(60)] for f in range(4)]  # shared prefixes
    pending = sorted(enumerate(reqs), key=lambda x: x[1][3])
    outs: dict[str, list[int]] = {}
    done: set[str] = set()
    aborted: set[str] = set()
    step = 0
    while pending or core.has_unfinished:
        while pending and pending[0][1][3] <= step:
            i, (fam, plen, max_new, _, _) = pending.pop(0)
            core.add_request(EngineRequest(request_id=str(i),
                                           prompt_token_ids=families[fam][:plen],
                                           params=SamplingParams(max_new_tokens=max_new)))
        for i, (_, _, _, arrival, abort_at) in enumerate(reqs):
            if abort_at == step and arrival <= step and str(i) not in done:
                core.abort(str(i))
                aborted.add(str(i))
        for eo in core.step():
            outs.setdefault(eo.request_id, []).extend(eo.new_token_ids)
            if eo.finish_reason is not None:
                done.add(eo.request_id)
        step += 1
        assert step < 5000, "no progress"
    assert_all_free(kv)
    for i, (fam, plen, max_new, _, _) in enumerate(reqs):
        if str(i) not in aborted:
            assert outs[str(i)] == expected_output(families[fam][:plen], max_new)
