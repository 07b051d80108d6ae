"""Prometheus metrics, written by hand in the text exposition format (version 0.0.4).

A handful of counters, gauges and one histogram do not justify a dependency. Labels are
bounded: the route is the app's path template (unknown paths are "other"), so a client
cannot grow the label set by requesting random URLs."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

# Request latency buckets (seconds): a few ms (tokenize) to minutes (long generations).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Thread-safe counters for requests, tokens and latency; gauges read when rendered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.bucket_counts: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            counts = self.bucket_counts.setdefault(route, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[route] += seconds
            self.latency_count[route] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A value read at each scrape (queue length, active streams)."""
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            lines += [
                "# HELP gpt2lab_requests_total HTTP requests answered, by method, route and status.",
                "# TYPE gpt2lab_requests_total counter",
            ]
            for (method, route, status), n in sorted(self.requests.items()):
                labels = f'method="{method}",route="{_escape(route)}",status="{status}"'
                lines.append(f"gpt2lab_requests_total{{{labels}}} {n}")
            lines += [
                "# HELP gpt2lab_prompt_tokens_total Prompt tokens of completion requests.",
                "# TYPE gpt2lab_prompt_tokens_total counter",
                f"gpt2lab_prompt_tokens_total {self.prompt_tokens}",
                "# HELP gpt2lab_completion_tokens_total Tokens generated.",
                "# TYPE gpt2lab_completion_tokens_total counter",
                f"gpt2lab_completion_tokens_total {self.completion_tokens}",
                "# HELP gpt2lab_request_duration_seconds Time to answer a request, by route.",
                "# TYPE gpt2lab_request_duration_seconds histogram",
            ]
            for route, counts in sorted(self.bucket_counts.items()):
                r = _escape(route)
                for bound, n in zip(BUCKETS, counts, strict=True):
                    lines.append(
                        f'gpt2lab_request_duration_seconds_bucket{{route="{r}",le="{bound}"}} {n}'
                    )
                total = self.latency_count[route]
                lines += [
                    f'gpt2lab_request_duration_seconds_bucket{{route="{r}",le="+Inf"}} {total}',
                    f'gpt2lab_request_duration_seconds_sum{{route="{r}"}} '
                    f"{self.latency_sum[route]:.6f}",
                    f'gpt2lab_request_duration_seconds_count{{route="{r}"}} {total}',
                ]
        for name, (help_text, read) in sorted(self.gauges.items()):
            try:
                value = float(read())
            except Exception:  # a gauge that cannot be read now is left out, not an error
                continue
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
