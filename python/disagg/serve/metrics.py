"""Prometheus text-format metrics, written by hand (counters, gauges, histograms)."""
from __future__ import annotations

import bisect

_LAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_: str, buckets=_LAT_BUCKETS):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        h = Histogram
        self.ttft = h("disagg_time_to_first_token_seconds", "Time to first token.")
        self.tpot = h("disagg_time_per_output_token_seconds",
                      "Mean time per output token after the first, per request.")
        self.itl = h("disagg_inter_token_latency_seconds", "Time between consecutive tokens.")
        self.queue = h("disagg_request_queue_time_seconds",
                       "Arrival to first token minus the prefill compute (queue + routing).")
        self.e2e = h("disagg_e2e_request_latency_seconds", "Arrival to last token.")
        self.kv_lat = h("disagg_kv_transfer_seconds", "KV transfer time, sender side.")
        self.kv_gbps = h("disagg_kv_transfer_gb_per_second", "KV transfer rate (GB/s) per request.",
                         (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100))
        self.kv_exposed = h("disagg_kv_transfer_exposed_seconds",
                            "Per request: KV transfer time after the prefill compute ended "
                            "(the part layer-wise sending did not hide).")
        self.counters = {"disagg_requests_total": 0, "disagg_requests_failed_total": 0,
                         "disagg_requests_aborted_total": 0, "disagg_requests_rejected_total": 0,
                         "disagg_prompt_tokens_total": 0, "disagg_generation_tokens_total": 0,
                         "disagg_kv_transfer_bytes_total": 0, "disagg_kv_transfers_total": 0,
                         "disagg_kv_transfer_failures_total": 0,
                         "disagg_kv_transfer_hidden_seconds_total": 0,
                         "disagg_kv_transfer_exposed_seconds_total": 0,
                         "disagg_kv_retries_total": 0}

    def inc(self, name: str, v: float = 1) -> None:
        self.counters[name] += v

    def render(self, gauges: list) -> str:
        lines = []
        for name, v in self.counters.items():
            lines += [f"# TYPE {name} counter", f"{name} {v}"]
        for hist in (self.ttft, self.tpot, self.itl, self.queue, self.e2e, self.kv_lat,
                     self.kv_gbps, self.kv_exposed):
            lines += hist.render()
        seen = set()
        for name, labels, v in gauges:
            if name not in seen:
                lines.append(f"# TYPE {name} gauge")
                seen.add(name)
            lab = ",".join(f'{k}="{val}"' for k, val in labels.items())
            lines.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")
        return "\n".join(lines) + "\n"
