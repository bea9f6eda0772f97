"""Serving-side simulators: expert-aware batching for pre-gated MoEs (Read-ME)."""

from jaxlab.serving.batching import (LatencyModel, Pending, Report, Request, Scheduler, Step, expert_aware, fcfs,
                                     simulate, synthetic_trace, trace_from_choices)

__all__ = ["LatencyModel", "Pending", "Report", "Request", "Scheduler", "Step", "expert_aware", "fcfs", "simulate",
           "synthetic_trace", "trace_from_choices"]
