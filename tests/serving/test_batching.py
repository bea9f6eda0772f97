"""The Read-ME batching simulator: hand-computed schedules and latencies, the LRU cache, FCFS equivalence with one
expert, expert-aware batching's gain on a trace with domain structure, the anti-starvation bound, determinism."""

import functools

import numpy as np
import pytest

from jaxlab.serving import (LatencyModel, Request, expert_aware, fcfs, simulate, synthetic_trace,
                            trace_from_choices)

# Powers of two, so that every hand-computed time is exact: a step costs 1 + tokens/8 + distinct/16 + 2 * loads.
HAND = LatencyModel(t_base=1.0, t_token=0.125, t_expert=0.0625, expert_bytes=200.0, bandwidth=100.0)
PATIENT = functools.partial(expert_aware, max_wait=np.inf)

# 4 requests at t=0, 1 prompt + 2 output tokens (a prefill and one decode), alternating between experts 0 and 1.
FOUR = trace_from_choices([0.0] * 4, [[0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]], prompt_tokens=1)


def steps(report):
  return [(s.start, s.duration, s.requests, s.experts, s.loads) for s in report.schedule]


def test_latency_model():
  default = LatencyModel()
  assert default.t_expert_load == pytest.approx(4e-3)  # 100 MB over 25 GB/s
  assert HAND.t_expert_load == 2.0
  assert HAND.step_time(tokens=3, distinct_experts=2, loads=1) == 1 + 3 / 8 + 2 / 16 + 2
  with pytest.raises(ValueError):
    LatencyModel(t_base=0.0)


def test_requests_and_traces_from_choices():
  trace = trace_from_choices([0.5, 0.25], [[3, 1, 2], [0, 0, 0, 1]], prompt_tokens=[1, 2])
  assert [(r.arrival, r.prompt_tokens, r.output_tokens) for r in trace] == [(0.5, 1, 2), (0.25, 2, 2)]
  np.testing.assert_array_equal(trace[1].experts, [0, 0, 0, 1])
  with pytest.raises(ValueError, match="one id per"):
    Request(0.0, 2, 2, np.zeros(3, int))
  with pytest.raises(ValueError, match="at least one"):
    trace_from_choices([0.0], [[0, 0]], prompt_tokens=2)
  with pytest.raises(ValueError, match="arrivals"):
    trace_from_choices([0.0, 1.0], [[0, 0]], prompt_tokens=1)


def test_synthetic_trace_statistics():
  trace = synthetic_trace(2000, 4, rate=50.0, seed=0, domain_prob=0.8, prompt_mean=6.0, output_mean=3.0)
  arrivals = np.array([r.arrival for r in trace])
  assert np.all(np.diff(arrivals) > 0)
  assert np.diff(arrivals).mean() == pytest.approx(1 / 50, rel=0.1)
  assert np.mean([r.prompt_tokens for r in trace]) == pytest.approx(6.0, rel=0.1)
  assert np.mean([r.output_tokens for r in trace]) == pytest.approx(3.0, rel=0.1)
  assert min(r.output_tokens for r in trace) == 1
  # A token hits its request's domain expert with probability p + (1 - p) / E = 0.85; the domain is the mode.
  hits = [np.mean(r.experts == np.bincount(r.experts).argmax()) for r in trace if len(r.experts) >= 20]
  assert np.mean(hits) == pytest.approx(0.85, abs=0.03)


def test_fcfs_by_hand():
  report = simulate(FOUR, fcfs, max_batch=2, latency_model=HAND, cache_experts=1)
  # Every step mixes experts 0 and 1, and a cache of one expert reloads expert 0 each time (1 stays, as most recent).
  assert steps(report) == [(0.0, 5.375, (0, 1), (0, 1), (0, 1)),
                           (5.375, 3.375, (0, 1), (0, 1), (0,)),
                           (8.75, 3.375, (2, 3), (0, 1), (0,)),
                           (12.125, 3.375, (2, 3), (0, 1), (0,))]
  np.testing.assert_array_equal(report.latency, [8.75, 8.75, 15.5, 15.5])
  assert (report.expert_loads, report.bytes_moved, report.mean_distinct_experts) == (5, 1000.0, 2.0)
  assert report.mean_latency == 12.125 and report.p50_latency == 12.125
  assert report.throughput == 8 / 15.5


def test_expert_aware_by_hand():
  report = simulate(FOUR, PATIENT, max_batch=2, latency_model=HAND, cache_experts=1)
  # Requests 0 and 2 share expert 0, 1 and 3 expert 1: two loads in all instead of five.
  assert steps(report) == [(0.0, 3.3125, (0, 2), (0,), (0,)),
                           (3.3125, 1.3125, (0, 2), (0,), ()),
                           (4.625, 3.3125, (1, 3), (1,), (1,)),
                           (7.9375, 1.3125, (1, 3), (1,), ())]
  np.testing.assert_array_equal(report.latency, [4.625, 9.25, 4.625, 9.25])
  assert (report.expert_loads, report.bytes_moved, report.mean_distinct_experts) == (2, 400.0, 1.0)
  assert report.mean_latency == 6.9375


def test_expert_aware_avoids_loads_before_distinct_experts():
  trace = trace_from_choices([0.0, 0.5, 0.5, 0.5], [[0, 1, 0], [0, 1, 0], [2, 2], [2, 2]], prompt_tokens=[2, 2, 1, 1])
  report = simulate(trace, PATIENT, max_batch=2, latency_model=HAND, cache_experts=2)
  # Request 0 leaves experts 0 and 1 resident. Request 1 needs both (two experts, no load), 2 and 3 need expert 2
  # (one expert, one load): 1 goes first; 2 still takes the second slot (work-conserving) and loads expert 2, which
  # request 3 then finds resident.
  assert steps(report) == [(0.0, 5.375, (0,), (0, 1), (0, 1)),
                           (5.375, 3.5625, (1, 2), (0, 1, 2), (2,)),
                           (8.9375, 1.1875, (3,), (2,), ())]


def test_fcfs_orders_by_arrival_then_index():
  trace = trace_from_choices([0.5, 0.0, 0.0], [[0, 0], [1, 1], [2, 2]], prompt_tokens=1)
  assert [s.requests for s in simulate(trace, fcfs, max_batch=1, latency_model=HAND).schedule] == [(1,), (2,), (0,)]


def test_anti_starvation_by_hand():
  report = simulate(FOUR, functools.partial(expert_aware, max_wait=3.0), max_batch=2, latency_model=HAND,
                    cache_experts=1)
  # At 3.3125 request 1 (one of the two oldest) has waited past 3 s, so it runs with request 3, which adds nothing;
  # at 6.625 request 0 has: the groups alternate and expert 0 and 1 are reloaded every step.
  assert steps(report) == [(0.0, 3.3125, (0, 2), (0,), (0,)),
                           (3.3125, 3.3125, (1, 3), (1,), (1,)),
                           (6.625, 3.3125, (0, 2), (0,), (0,)),
                           (9.9375, 3.3125, (1, 3), (1,), (1,))]
  np.testing.assert_array_equal(report.latency, [9.9375, 13.25, 9.9375, 13.25])


def test_iterations_arrivals_and_idle_gaps_by_hand():
  trace = [Request(0.5, 3, 3, np.array([0, 1, 0, 1, 0, 2])),  # prefill {0, 1}, then experts[3] = 1, experts[4] = 0
           Request(1.0, 1, 1, np.array([2, 2])),  # arrives during the first step, so joins the second
           Request(100.0, 2, 1, np.array([0, 0, 1]))]  # arrives when all is done: the clock jumps
  report = simulate(trace, fcfs, max_batch=2, latency_model=HAND, cache_experts=0)  # no cache: stream everything
  assert steps(report) == [(0.5, 1 + 3 / 8 + 2 / 16 + 4, (0,), (0, 1), (0, 1)),
                           (6.0, 1 + 2 / 8 + 2 / 16 + 4, (0, 1), (1, 2), (1, 2)),
                           (11.375, 1 + 1 / 8 + 1 / 16 + 2, (0,), (0,), (0,)),
                           (100.0, 1 + 2 / 8 + 1 / 16 + 2, (2,), (0,), (0,))]
  np.testing.assert_array_equal(report.latency, [14.0625, 10.375, 3.3125])
  assert report.throughput == 5 / (103.3125 - 0.5)


def test_lru_cache_by_hand():
  trace = trace_from_choices(np.arange(5.0), [[e, e] for e in [0, 1, 0, 2, 1]], prompt_tokens=1)
  report = simulate(trace, fcfs, max_batch=1, latency_model=HAND, cache_experts=2)
  # LRU evicts 1 (not 0, which was used more recently) to load 2, so 1 is loaded again; FIFO would keep 1.
  assert [s.loads for s in report.schedule] == [(0,), (1,), (), (2,), (1,)]
  assert simulate(trace, fcfs, max_batch=1, latency_model=HAND).expert_loads == 0  # all resident


@pytest.mark.parametrize("cache_experts", [None, 0, 1])
def test_one_expert_makes_expert_aware_fcfs(cache_experts):
  trace = synthetic_trace(60, 1, rate=400.0, seed=1, prompt_mean=4.0, output_mean=8.0)
  reference = simulate(trace, fcfs, max_batch=4, cache_experts=cache_experts)
  assert max(len(s.requests) for s in reference.schedule) == 4  # overloaded: the scheduler has choices to make
  for max_wait in [0.0, 0.02, np.inf]:
    report = simulate(trace, functools.partial(expert_aware, max_wait=max_wait), max_batch=4,
                      cache_experts=cache_experts)
    assert report.schedule == reference.schedule
    np.testing.assert_array_equal(report.latency, reference.latency)


DOMAINS = synthetic_trace(150, 8, rate=150.0, seed=2, domain_prob=0.95, prompt_mean=8.0, output_mean=24.0)


@pytest.mark.parametrize("cache_experts", [None, 2])
def test_expert_aware_beats_fcfs_on_domain_structure(cache_experts):
  base = simulate(DOMAINS, fcfs, max_batch=8, cache_experts=cache_experts)
  ours = simulate(DOMAINS, expert_aware, max_batch=8, cache_experts=cache_experts)
  assert ours.mean_distinct_experts < 0.8 * base.mean_distinct_experts
  assert ours.bytes_moved <= base.bytes_moved
  assert ours.mean_latency < base.mean_latency
  if cache_experts is not None:
    assert ours.bytes_moved < 0.7 * base.bytes_moved


def top_waits(trace, report, max_batch):
  """Replays the schedule. At each step, for each of the ``max_batch`` oldest active requests (those FCFS would run):
  how long since it last ran (or arrived), how long it has been among them without running, and whether it runs."""
  arrival = np.array([r.arrival for r in trace])
  finish = arrival + report.latency
  last, entered = arrival.copy(), np.full(len(trace), np.inf)
  waits = []
  for step in report.schedule:
    active = [i for i in sorted(range(len(trace)), key=lambda i: (arrival[i], i))
              if arrival[i] <= step.start < finish[i]]
    entered[[i for i in range(len(trace)) if i not in active[:max_batch]]] = np.inf
    for i in active[:max_batch]:
      entered[i] = min(entered[i], step.start)
      waits.append((step.start - last[i], step.start - max(last[i], entered[i]), i in step.requests))
    last[list(step.requests)] = step.start + step.duration
  return waits


def test_anti_starvation_bound():
  max_wait = 0.05
  for policy, bounded in [(functools.partial(expert_aware, max_wait=max_wait), True), (PATIENT, False)]:
    report = simulate(DOMAINS, policy, max_batch=8, cache_experts=1)
    longest = max(s.duration for s in report.schedule)
    waits = top_waits(DOMAINS, report, max_batch=8)
    # One of the oldest max_batch requests that has not run for max_wait runs now, so none of them waits among the
    # oldest for more than max_wait plus the step in progress.
    assert all(ran for since_run, _, ran in waits if since_run > max_wait) == bounded
    assert (max(among_oldest for _, among_oldest, _ in waits) <= max_wait + longest) == bounded


def test_a_lone_expert_is_not_starved():
  # Request 1 is the only one on expert 1 and one of the two oldest from its arrival on; a stream of expert-0
  # requests would keep it out until the stream ends if nothing bounded its wait.
  stream = [[0] * 21 for _ in range(40)]
  trace = trace_from_choices([0.0, 1e-3] + list(2e-3 + 5e-3 * np.arange(40)), [[0] * 21, [1] * 6] + stream, 1)
  first_run = {}
  for max_wait in [0.05, np.inf]:
    report = simulate(trace, functools.partial(expert_aware, max_wait=max_wait), max_batch=2, cache_experts=1)
    first_run[max_wait] = next(s.start for s in report.schedule if 1 in s.requests) - 1e-3
    longest = max(s.duration for s in report.schedule)
  assert first_run[0.05] <= 0.05 + longest
  assert first_run[np.inf] > 10 * (0.05 + longest)


def test_deterministic():
  a, b = synthetic_trace(50, 4, 100.0, seed=3), synthetic_trace(50, 4, 100.0, seed=3)
  assert all(x.arrival == y.arrival and np.array_equal(x.experts, y.experts) for x, y in zip(a, b))
  assert synthetic_trace(50, 4, 100.0, seed=4)[0].arrival != a[0].arrival
  for policy in [fcfs, expert_aware]:
    first, second = (simulate(trace, policy, max_batch=4, cache_experts=2) for trace in (a, b))
    assert first.schedule == second.schedule and first.summary() == second.summary()


def test_bad_scheduler_is_refused():
  with pytest.raises(ValueError, match="must pick"):
    simulate(FOUR, lambda pending, max_batch: np.arange(0), max_batch=2)
  with pytest.raises(ValueError, match="must pick"):
    simulate(FOUR, lambda pending, max_batch: np.arange(3), max_batch=2)
