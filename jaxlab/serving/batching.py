"""Expert-aware batching for a pre-gated MoE, simulated over a request trace (Read-ME, Cai et al., NeurIPS 2024).

Read-ME routes every token with one router that reads only token ids, and uses the same expert in every layer, so
the expert each queued token needs is known before the backbone runs. A server can then batch by expert: each step
touches few distinct experts, and experts can be cached or prefetched. This module is a pure-numpy simulator of that
system side; it needs no model.

Requests. ``Request.experts[t]`` is the pre-gated expert of token ``t`` of the prompt followed by the output. A request
with P prompt and O output tokens takes O iterations: iteration 0 is its prefill, which runs all P prompt tokens,
needs every expert among them, and emits output token 0; iteration k >= 1 runs the previous output token (position
P + k - 1) and needs its expert. The last output token's expert is never needed (it is not fed back). Attention cost
growing with context, KV-cache memory and chunked prefill are not modelled; prefills and decodes share a step.

Loop (iteration-level continuous batching). A request is active from its arrival until its last iteration. At the
start of each step the scheduler picks at most ``max_batch`` active requests, each of which advances one iteration;
requests that arrive during a step join at the next one; with nothing active the clock jumps to the next arrival.
A request that is not picked keeps its place (its KV cache is assumed to stay resident).

Schedulers. Both are work-conserving: they fill every slot while active requests remain.
- ``fcfs``: the ``max_batch`` oldest active requests (by arrival, then trace index). This is ordinary continuous
  batching: a running request is never displaced by a younger one.
- ``expert_aware``: (1) *due* requests first: among the ``max_batch`` oldest active requests (those ``fcfs`` would
  run), the ones that have not run for more than ``max_wait`` seconds (since their last iteration ended, or since
  arrival), so nothing FCFS would serve is held back longer than ``max_wait`` plus the step in progress; (2) then
  greedily, one request at a time, the one with the least (experts it adds that are not resident, experts it adds
  to the step, age rank), where "adds" means not needed by the requests already picked. Requests that add nothing
  are taken oldest first. With one expert this is exactly ``fcfs``.

Expert cache. With ``cache_experts=None`` every expert is resident (the whole model sits in fast memory, nothing
moves). With ``cache_experts=k`` fast memory holds k experts and starts empty; every needed expert that is not resident
is loaded before the step; after it the experts the step used become most recently used (in ascending id order) and
the least recently used are evicted down to k. ``k=0`` streams every needed expert every step.

Latency model (``LatencyModel``), one step::

  t = t_base + t_token * tokens_in_batch + t_expert * distinct_experts + t_expert_load * experts_loaded,
  t_expert_load = expert_bytes / bandwidth

Defaults, for a 7B-class model on an A100-class GPU with experts offloaded over PCIe: ``t_base = 6 ms`` (a decode
step is memory bound: ~13 GB of bf16 weights read at ~2 TB/s); ``t_token = 60 us`` (~10 GFLOP per token at ~160
TFLOP/s sustained); ``t_expert = 100 us`` per distinct expert (a grouped matmul that reads a 100 MB expert from HBM,
plus launches); ``expert_bytes = 100 MB``; ``bandwidth = 25 GB/s`` (PCIe 4.0 x16), so ``t_expert_load = 4 ms``.
Terms add: transfers do not overlap compute (Read-ME's prefetching would hide part of them), and compute does not
overlap memory traffic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
  """One request; ``experts`` holds the pre-gated expert of each of its prompt + output tokens."""

  arrival: float
  prompt_tokens: int
  output_tokens: int
  experts: np.ndarray

  def __post_init__(self):
    experts = np.asarray(self.experts, dtype=np.int64)
    object.__setattr__(self, "experts", experts)
    if self.prompt_tokens < 1 or self.output_tokens < 1:
      raise ValueError(f"a request needs at least one prompt and one output token, got {self.prompt_tokens} and "
                       f"{self.output_tokens}")
    if experts.shape != (self.prompt_tokens + self.output_tokens,):
      raise ValueError(f"experts must have one id per prompt + output token "
                       f"({self.prompt_tokens + self.output_tokens}), got shape {experts.shape}")
    if experts.min() < 0:
      raise ValueError("expert ids must be non-negative")


def synthetic_trace(num_requests: int, num_experts: int, rate: float, seed: int, *, domain_prob: float = 0.8,
                    prompt_mean: float = 128.0, output_mean: float = 128.0) -> list[Request]:
  """A trace with Read-ME's structure: each request comes from a domain whose tokens mostly go to one expert.

  Arrivals are Poisson at ``rate`` requests/s. Prompt and output lengths are geometric on {1, 2, ...} with means
  ``prompt_mean`` and ``output_mean``. A request's domain d is uniform over the experts; each of its tokens goes to
  expert d with probability ``domain_prob`` and otherwise to an expert drawn uniformly from all of them (d included).
  """
  if prompt_mean < 1 or output_mean < 1:
    raise ValueError("mean lengths must be at least 1")
  rng = np.random.default_rng(seed)
  arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
  domains = rng.integers(num_experts, size=num_requests)
  prompts = rng.geometric(1.0 / prompt_mean, num_requests)
  outputs = rng.geometric(1.0 / output_mean, num_requests)
  trace = []
  for arrival, domain, prompt, output in zip(arrivals, domains, prompts, outputs):
    length = prompt + output
    experts = np.where(rng.random(length) < domain_prob, domain, rng.integers(num_experts, size=length))
    trace.append(Request(float(arrival), int(prompt), int(output), experts))
  return trace


def trace_from_choices(arrivals: Sequence[float], experts: Sequence[Sequence[int]],
                       prompt_tokens: int | Sequence[int]) -> list[Request]:
  """A trace from real pre-gated choices: ``experts[i]`` is a router's expert for each token of request i's prompt
  and output, of which the first ``prompt_tokens`` (one count, or one per request) are the prompt."""
  if len(arrivals) != len(experts):
    raise ValueError(f"{len(arrivals)} arrivals for {len(experts)} requests")
  prompts = [prompt_tokens] * len(experts) if isinstance(prompt_tokens, int) else list(prompt_tokens)
  if len(prompts) != len(experts):
    raise ValueError(f"{len(prompts)} prompt lengths for {len(experts)} requests")
  return [Request(float(arrival), int(prompt), len(ids) - int(prompt), np.asarray(ids))
          for arrival, ids, prompt in zip(arrivals, experts, prompts)]


@dataclasses.dataclass(frozen=True)
class LatencyModel:
  """Seconds per step; the formula and the defaults' rationale are in the module docstring."""

  t_base: float = 6e-3
  t_token: float = 6e-5
  t_expert: float = 1e-4
  expert_bytes: float = 100e6
  bandwidth: float = 25e9

  def __post_init__(self):
    if self.t_base <= 0 or min(self.t_token, self.t_expert, self.expert_bytes) < 0 or self.bandwidth <= 0:
      raise ValueError(f"t_base and bandwidth must be positive and the rest non-negative: {self}")

  @property
  def t_expert_load(self) -> float:
    return self.expert_bytes / self.bandwidth

  def step_time(self, tokens: int, distinct_experts: int, loads: int) -> float:
    return self.t_base + self.t_token * tokens + self.t_expert * distinct_experts + self.t_expert_load * loads


@dataclasses.dataclass(frozen=True, eq=False)
class Pending:
  """What a scheduler sees at the start of a step: the active requests, oldest first (by arrival, then index)."""

  ids: np.ndarray  # [A] trace indices
  waited: np.ndarray  # [A] seconds since each last ran, or arrived if it has not run
  need: np.ndarray  # [A, E] bool: the experts each needs for its next iteration
  resident: np.ndarray  # [E] bool: the experts in fast memory


Scheduler = Callable[[Pending, int], np.ndarray]
"""Picks at most ``max_batch`` requests: returns their positions in ``Pending.ids``."""


def fcfs(pending: Pending, max_batch: int) -> np.ndarray:
  """First come first served: the ``max_batch`` oldest active requests."""
  return np.arange(min(len(pending.ids), max_batch))


def expert_aware(pending: Pending, max_batch: int, *, max_wait: float = 0.5) -> np.ndarray:
  """Read-ME's expert-aware batching: due requests first, then greedily those adding the fewest loads, then the
  fewest distinct experts, then the oldest (the exact policy is in the module docstring)."""
  count = len(pending.ids)
  if count <= max_batch:
    return np.arange(count)
  oldest = np.arange(max_batch)
  taken = np.zeros(count, dtype=bool)
  taken[oldest[pending.waited[oldest] > max_wait]] = True
  covered = pending.need[taken].any(axis=0)
  while taken.sum() < max_batch:
    extra = pending.need & ~covered
    fits = np.flatnonzero(~taken & ~extra.any(axis=1))  # key (0, 0, age): the picks one at a time would make
    taken[fits[:max_batch - taken.sum()]] = True
    if taken.sum() == max_batch:
      break
    rest = np.flatnonzero(~taken)
    loads = (extra[rest] & ~pending.resident).sum(axis=1)
    pick = rest[np.lexsort((rest, extra[rest].sum(axis=1), loads))[0]]
    taken[pick] = True
    covered |= pending.need[pick]
  return np.flatnonzero(taken)


@dataclasses.dataclass(frozen=True)
class Step:
  """One iteration: when it started, how long it took, whom it ran (oldest first), the experts it used and loaded."""

  start: float
  duration: float
  requests: tuple[int, ...]
  experts: tuple[int, ...]
  loads: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Report:
  """The outcome of ``simulate``; ``latency[i]`` is request i's arrival to its last token, in seconds."""

  latency: np.ndarray
  output_tokens: int
  span: float  # first arrival to last token
  expert_bytes: float
  schedule: tuple[Step, ...]

  @property
  def mean_latency(self) -> float:
    return float(self.latency.mean())

  @property
  def p50_latency(self) -> float:
    return float(np.percentile(self.latency, 50))

  @property
  def p99_latency(self) -> float:
    return float(np.percentile(self.latency, 99))

  @property
  def throughput(self) -> float:
    """Output tokens per second over the span."""
    return self.output_tokens / self.span

  @property
  def mean_distinct_experts(self) -> float:
    return float(np.mean([len(step.experts) for step in self.schedule]))

  @property
  def expert_loads(self) -> int:
    return sum(len(step.loads) for step in self.schedule)

  @property
  def bytes_moved(self) -> float:
    return self.expert_loads * self.expert_bytes

  def summary(self) -> dict[str, float]:
    names = ["mean_latency", "p50_latency", "p99_latency", "throughput", "mean_distinct_experts", "expert_loads",
             "bytes_moved"]
    return {"steps": len(self.schedule)} | {name: getattr(self, name) for name in names}


def simulate(trace: Sequence[Request], scheduler: Scheduler, *, max_batch: int = 16,
             latency_model: LatencyModel = LatencyModel(), cache_experts: int | None = None) -> Report:
  """Runs ``trace`` through the continuous-batching loop with ``scheduler`` (deterministic)."""
  if not trace:
    raise ValueError("empty trace")
  if max_batch < 1 or (cache_experts is not None and cache_experts < 0):
    raise ValueError(f"need max_batch >= 1 and cache_experts None or >= 0, got {max_batch} and {cache_experts}")
  count = len(trace)
  arrival = np.array([r.arrival for r in trace], dtype=np.float64)
  prompt = np.array([r.prompt_tokens for r in trace])
  iterations = np.array([r.output_tokens for r in trace])
  num_experts = 1 + max(int(r.experts.max()) for r in trace)
  one_hot = np.eye(num_experts, dtype=bool)
  prefill_need = np.zeros((count, num_experts), dtype=bool)
  decode_expert = np.zeros((count, iterations.max()), dtype=np.int64)  # [i, k]: expert of iteration k >= 1
  for i, r in enumerate(trace):
    prefill_need[i, r.experts[:r.prompt_tokens]] = True
    decode_expert[i, 1:r.output_tokens] = r.experts[r.prompt_tokens:-1]
  order = np.lexsort((np.arange(count), arrival))
  done = np.zeros(count, dtype=np.int64)
  last = arrival.copy()
  finish = np.zeros(count)
  lru: list[int] = []  # resident experts, least recently used first
  schedule = []
  now = float(arrival.min())
  unfinished = count
  while unfinished:
    waiting = done[order] < iterations[order]
    ids = order[waiting & (arrival[order] <= now)]
    if not ids.size:
      now = float(arrival[order[waiting]].min())
      continue
    k = done[ids]
    need = np.where((k == 0)[:, None], prefill_need[ids], one_hot[decode_expert[ids, k]])
    resident = np.ones(num_experts, dtype=bool) if cache_experts is None else one_hot[lru].any(axis=0)
    picked = np.asarray(scheduler(Pending(ids, now - last[ids], need, resident), max_batch))
    if not 0 < picked.size <= max_batch or np.unique(picked).size != picked.size:
      raise ValueError(f"the scheduler must pick 1..{max_batch} distinct requests, got positions {picked}")
    picked = np.sort(picked)
    batch = ids[picked]
    used = need[picked].any(axis=0)
    experts, loads = np.flatnonzero(used).tolist(), np.flatnonzero(used & ~resident).tolist()
    tokens = int(np.where(k[picked] == 0, prompt[batch], 1).sum())
    duration = latency_model.step_time(tokens, len(experts), len(loads))
    schedule.append(Step(now, duration, tuple(batch.tolist()), tuple(experts), tuple(loads)))
    now += duration
    done[batch] += 1
    last[batch] = now
    ended = batch[done[batch] == iterations[batch]]
    finish[ended] = now
    unfinished -= ended.size
    if cache_experts is not None:
      lru = [e for e in lru if not used[e]] + experts
      lru = lru[max(0, len(lru) - cache_experts):]
  return Report(finish - arrival, int(iterations.sum()), float(finish.max() - arrival.min()),
                latency_model.expert_bytes, tuple(schedule))
