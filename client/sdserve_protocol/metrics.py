"""Names of the metrics an sdserve server publishes (Prometheus text, Triton's metrics port).

The pipeline model publishes them; the web UI, the benchmarks and the Kubernetes autoscaler
read them.
"""

# The pipeline model's custom metrics (all labelled `model`), published from its batcher's
# reports: Triton's own counters see a request succeed when `execute` hands it over.
PENDING_METRIC = "sdserve_queue_pending_requests"
"""Gauge: requests accepted and waiting to start."""
QUEUE_DURATION_METRIC = "sdserve_queue_duration_us"
"""Counter: microseconds requests waited before starting."""
REQUESTS_METRIC = "sdserve_requests_total"
"""Counter, labels `model` and `outcome` (`OUTCOMES`): every request, counted once when answered
(those refused before queueing included)."""
OUTCOMES = ("success", "invalid", "cancelled", "timeout", "overloaded", "failed")
"""The `outcome` label: answered with images; INVALID_ARG; CANCELLED; UNAVAILABLE after waiting
past its queue timeout; UNAVAILABLE at once (queue full, or memory budget); anything else."""
DURATION_METRIC = "sdserve_request_duration_us"
"""Histogram (`_bucket{le}`, `_sum`, `_count`): microseconds from taking a request to answering
it, every outcome."""
QUEUE_WAIT_METRIC = "sdserve_queue_wait_us"
"""Histogram: microseconds each request that entered the queue waited before leaving it
(started, timed out or cancelled)."""
OUTSTANDING_STEPS_METRIC = "sdserve_outstanding_steps"
"""Gauge: denoising steps left over the queued and running requests (queued: steps x strength,
outpainting: x images x bands; running: the steps left on its schedule). The autoscaling
signal: a 50-step request weighs 12 times a 4-step one."""
MEMORY_RESERVED_METRIC = "sdserve_memory_reserved_bytes"
"""Gauge: estimated peak memory of the requests taken (admission by memory)."""
MEMORY_BUDGET_METRIC = "sdserve_memory_budget_bytes"
"""Gauge: the memory budget those may hold (0: none); summed over the model's instances."""
SUCCESS_METRIC = "nv_inference_request_success"
"""Triton's request counter (labels `model`, `version`). The pipeline answers through response
senders, so Triton counts a request when `execute` hands it to the batcher (later error answers
included): every request that entered the queue. Read only by servers from before
`sdserve_queue_wait_us`, for the mean queue wait."""
