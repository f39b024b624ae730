"""serve/best_of.py: the n best candidates of each prompt, by cumulative logprob."""
from disagg_mpi.api import Response, Result, TokenLogprobs
from disagg_mpi.serve.best_of import best_candidates, cumulative_logprob, pick_best


def test_n_best_per_prompt_best_first_ties_keep_order():
    scores = [-3.0, -1.0, -2.0, -1.0,    # prompt 0
              -0.5, -9.0, -0.1, -4.0]    # prompt 1
    assert pick_best(scores, 4, 2) == [1, 3, 6, 4]
    assert pick_best(scores, 4, 1) == [1, 6]


def _resp(lps):
    return Response(1, Result([7] * len(lps), True, "length", log_probs=[TokenLogprobs(x) for x in lps]))


def test_scores_and_billing():
    a, b = _resp([-0.5, -0.25]), _resp([-0.1, -2.0, -0.1])
    assert cumulative_logprob(a) == -0.75
    assert cumulative_logprob(Response(2, Result([], True, "length"))) == float("-inf")
    assert best_candidates([a, b], 2, 1) == ([0], 5)   # the best of two, all five tokens billed
