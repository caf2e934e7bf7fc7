"""The demo is the package's main job on a fresh CPU machine: it must run the
draft -> verify loop, show the Markov head helping, and its losslessness
check must be able to fail."""

import torch

from dspark_kernels import demo


def test_demo_runs_and_passes(capsys):
    assert demo.main(["--rounds", "60", "--sched-rounds", "20", "--requests", "32"]) == 0
    out = capsys.readouterr().out
    assert "Markov head on" in out and "Markov head off" in out
    assert "heavy  async" in out
    assert "FAIL" not in out


def test_markov_head_raises_acceptance():
    target = demo.SyntheticTarget(vocab=48, rank=16, temperature=1.0, seed=0)
    kw = dict(rounds=60, requests=32, gamma=5, vocab=48, rank=16, temperature=1.0, seed=0,
              backend="reference", target=target)
    on = demo.run(markov_head=True, **kw)[0]
    off = demo.run(markov_head=False, **kw)[0]
    assert sum(on) / len(on) > sum(off) / len(off) + 0.1


def test_scheduler_trades_verify_tokens_for_throughput_under_heavy_load():
    target = demo.SyntheticTarget(vocab=48, rank=16, temperature=1.0, seed=0)
    kw = dict(rounds=40, requests=32, gamma=5, vocab=48, rank=16, temperature=1.0, seed=0,
              markov_head=True, backend="reference", target=target, load="heavy")

    def throughput(policy):
        accepted, counts, verified, times = demo.run(policy=policy, **kw)
        assert demo.transition_test(counts, target.probs)[2] > 1e-4
        rate = sum((a + 1) / t for a, t in zip(accepted, times)) / len(times)
        return sum(verified) / len(verified), rate

    fixed_tokens, fixed_rate = throughput("fixed")
    for policy in ("causal", "async"):
        tokens, rate = throughput(policy)
        assert tokens < 0.6 * fixed_tokens  # the heavy curve makes long verifies unprofitable
        assert rate > 1.15 * fixed_rate


def test_transition_check_rejects_a_wrong_chain():
    target = demo.SyntheticTarget(vocab=16, rank=8, temperature=1.0, seed=1)
    g = torch.Generator().manual_seed(0)
    n = 2000
    good = torch.stack([torch.bincount(torch.multinomial(target.probs[i], n, True, generator=g), minlength=16)
                        for i in range(16)])
    assert demo.transition_test(good, target.probs)[2] > 1e-3
    skewed = torch.softmax(target.logits / 1.3, dim=-1)  # a slightly cooler chain
    bad = torch.stack([torch.bincount(torch.multinomial(skewed[i], n, True, generator=g), minlength=16)
                       for i in range(16)])
    assert demo.transition_test(bad, target.probs)[2] < 1e-6
