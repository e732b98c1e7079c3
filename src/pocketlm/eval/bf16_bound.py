"""How far bf16 scoring can move a decision: the bound within which ``precision="auto"`` re-scores in fp32.

pocketlm's bf16 path (`pocketlm.eval.loglik`) runs the model body in bf16 autocast, the output layer and
log-softmax in fp32, and the predictions at each sequence's first two positions in fp32. A bias suite's decision
compares answers of one item (CrowS: ll_more > ll_less; BBQ: the argmax of three), so what bf16 must not move past
the margin is a *compared difference* ll_i − ll_j. Each answer of n continuation tokens gets the bound
c·√n, and an item is re-scored in fp32 when a compared difference is within the sum of its two answers' bounds
(`pocketlm.audit.bias_core.pair_near_ties`, `argmax_near_ties`).

Evidence (``benchmarks/bf16_error.py``; raw answers in ``outputs/bf16-error/``; 2 cores, 1 thread, fp32 vs bf16 on
the same requests, batch 16; measured when a bf16 run did not pack shared prefixes — the probe that allows packing
ran in bf16 and failed on bf16 noise — so bf16 rows were plain and fp32 rows packed; re-measured packed below):

* per token (body wholly in bf16): |Δ| median 0.015, q99 0.12, max 0.69 nats at positions ≥ 2; at position 1 up to
  3.7 (q99 1.3) on the teacher — the attention sinks' massive activations, hence fp32 there;
* per sequence (the scorer's path): teacher CrowS-Pairs (3,016 sentences) |Δ| median 0.079, q99.9 1.2, max 1.65
  nats; |Δ|/√n median 0.021, max 0.39; BBQ (720 answers of 240 items) max 0.24; student (SmolLM2 depth-pruned to 15
  layers, distilled) CrowS (1,000) max 0.49, BBQ (450) max 0.15;
* the compared differences, |e_i − e_j| / (√n_i + √n_j), which is what c must cover: largest 0.1285 (teacher,
  CrowS pair 1237), 0.096 (teacher BBQ), 0.0325 (student CrowS), 0.069 (student BBQ); q99 0.052 and q99.9 0.10 on
  the teacher's CrowS. Errors are heavy-tailed (single tokens move by up to 0.7 nats), so √n, n, a constant and
  mixtures all need about the same share of items re-scored for the same safety; √n is kept.

c = 1.5 × the largest measured (0.1285) = 0.2 (rounded up). Re-scored at c = 0.2: 28.6 % of the teacher's CrowS
pairs, 30.8 % of its BBQ sample, 32 % / 18 % of the student's; plain bf16 decides 10 CrowS pairs and 2 BBQ items of
those differently from fp32, auto none. A smaller c re-scores less (0.1: 14 % of CrowS) with no decision wrong on
the measured data down to c = 0.03, but would leave measured differences outside their bound.

Re-measured with bf16 packing as fp32 does (``python benchmarks/bf16_error.py --raw FILE --bbq-limit 1200
--token-items 0``; the record holds the tokens each precision ran: equal), teacher: all 1,508 CrowS pairs, largest
compared-difference ratio 0.108, largest error / bound 0.54, re-scored 28.8 %, plain bf16 decides 11 pairs differently
from fp32, auto none; 1,200 seeded BBQ items over all six categories, ratio 0.091, error / bound 0.45, re-scored
28.6 %, plain bf16 9 items, auto none. Student (the 15-layer depth-pruned one, ``--no-teacher --student
outputs/bench-compression-frontier/students/50-depth --crows-limit 1000 --bbq-limit 150``): CrowS ratio 0.034, error /
bound 0.17, re-scored 32 %, plain bf16 7 pairs, auto none; BBQ ratio 0.069, 0.35, re-scored 18 %, plain bf16 1, auto
none. Teacher, 3,000 more BBQ items (``--bbq-limit 3000 --seed 1``): ratio 0.113, error / bound 0.56, re-scored
30.1 %, plain bf16 29 items, auto none. Every compared difference within its bound; c stays 0.2 (1.78x the largest
ratio measured with packing).

The bound is a safety margin fitted to these measurements, not a proof: a model whose bf16 error is far larger than
the SmolLM2 family's could exceed it. ``benchmarks/bf16_error.py --student FOLDER`` checks it on another model (every
compared difference within its bound, every decision equal to fp32's).
"""
from __future__ import annotations

import numpy as np

BF16_ERROR_PER_SQRT_TOKEN = 0.2  # c: 1.5 x the largest measured compared-difference ratio (0.1285), rounded up
MEASUREMENT = ("benchmarks/bf16_error.py: largest |e_i - e_j| / (sqrt n_i + sqrt n_j) 0.1285 over SmolLM2-135M-"
               "Instruct and a 15-layer student on CrowS-Pairs and BBQ, times 1.5")


def bf16_error_bound(tokens: np.ndarray) -> np.ndarray:
    """Each answer's share of the bound on a compared difference's bf16 error (nats), for answers of ``tokens``
    continuation tokens (elementwise): c·√n."""
    return BF16_ERROR_PER_SQRT_TOKEN * np.sqrt(np.asarray(tokens, dtype=np.float64))


def describe_bound() -> str:
    """One line for results: the bound and where it comes from."""
    return (f"re-scored in fp32 when |ll_i - ll_j| <= {BF16_ERROR_PER_SQRT_TOKEN} * (sqrt(continuation tokens i) + "
            f"sqrt(continuation tokens j)) nats for a pair the decision compares ({MEASUREMENT})")
