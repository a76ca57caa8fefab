"""Counters and latency histograms of the engine, written in Prometheus' text format for GET /metrics (the names
follow vLLM's: vllm:time_to_first_token_seconds -> danlu:time_to_first_token_seconds, ...)."""
from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bucket (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return lines + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self, prefix_cache=None):
        self._lock = threading.Lock()
        self.prefix_cache = prefix_cache  # its token counters are reported, when there is one
        self.requests = Counter()  # by finish reason
        self.prompt_token_count = 0
        self.generation_token_count = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)

    def prompt_tokens(self, count: int) -> None:
        with self._lock:
            self.prompt_token_count += count

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def decode_step(self, seconds: float, rows: int) -> None:
        """One decode step gave each of `rows` requests a token in `seconds`."""
        with self._lock:
            self.per_token.observe(seconds, rows)

    def finished(self, reason: str, tokens: int) -> None:
        with self._lock:
            self.requests[reason] += 1
            self.generation_token_count += tokens

    def prometheus(self, load: dict) -> str:
        with self._lock:
            lines = [
                "# HELP danlu:num_requests_running Requests holding a KV-cache slot.",
                "# TYPE danlu:num_requests_running gauge", f"danlu:num_requests_running {load['running']}",
                "# HELP danlu:num_requests_waiting Requests queued for a slot.",
                "# TYPE danlu:num_requests_waiting gauge", f"danlu:num_requests_waiting {load['waiting']}",
                "# HELP danlu:request_success_total Finished requests by finish reason.",
                "# TYPE danlu:request_success_total counter",
                *[f'danlu:request_success_total{{finished_reason="{reason}"}} {count}'
                  for reason, count in sorted(self.requests.items())],
                "# HELP danlu:prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE danlu:prompt_tokens_total counter", f"danlu:prompt_tokens_total {self.prompt_token_count}",
                "# HELP danlu:generation_tokens_total Tokens generated.",
                "# TYPE danlu:generation_tokens_total counter",
                f"danlu:generation_tokens_total {self.generation_token_count}",
                "# HELP danlu:time_to_first_token_seconds Time from submission to the first token.",
                "# TYPE danlu:time_to_first_token_seconds histogram",
                *self.ttft.lines("danlu:time_to_first_token_seconds"),
                "# HELP danlu:time_per_output_token_seconds Time of the decode step that gave a token.",
                "# TYPE danlu:time_per_output_token_seconds histogram",
                *self.per_token.lines("danlu:time_per_output_token_seconds"),
                *self._prefix_cache_lines(),
            ]
        return "\n".join(lines) + "\n"

    def _prefix_cache_lines(self) -> list[str]:
        if self.prefix_cache is None:
            return []
        return ["# HELP danlu:prefix_cache_queries_total Prompt tokens looked up in the prefix cache.",
                "# TYPE danlu:prefix_cache_queries_total counter",
                f"danlu:prefix_cache_queries_total {self.prefix_cache.queried_tokens}",
                "# HELP danlu:prefix_cache_hits_total Prompt tokens found in the prefix cache (not prefilled).",
                "# TYPE danlu:prefix_cache_hits_total counter",
                f"danlu:prefix_cache_hits_total {self.prefix_cache.hit_tokens}"]
