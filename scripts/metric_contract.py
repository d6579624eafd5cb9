"""Valet's metric contract, as the code exports it (`valet metrics`).

The checks of the alert rules, the dashboard and README's metric table read this,
never a copy: src/metrics_contract.rs is the one list, and its unit tests hold it
to what the recorder renders.
"""

import json
import subprocess

# Prometheus adds these to every scraped series; the others depend on the scrape
# config (Kubernetes service discovery, a PodMonitor).
SCRAPE_LABELS = {"job", "instance"}
TARGET_LABELS = SCRAPE_LABELS | {
    "namespace",
    "pod",
    "container",
    "service",
    "endpoint",
    "node",
}


class Contract:
    """Series names and their labels. A histogram `h` is exposed as `h_bucket`
    (with `le`), `h_sum` and `h_count`; `up` is Prometheus's own."""

    def __init__(self, doc):
        self.metrics = {m["name"]: m for m in doc["metrics"]}
        self.histograms = {n for n, m in self.metrics.items() if m["type"] == "histogram"}
        # series name -> {label: set of values, or None when configured}
        self.series = {"up": {}}
        for name, m in self.metrics.items():
            labels = {
                lab["name"]: (set(lab["values"]) if lab["values"] is not None else None)
                for lab in m["labels"]
            }
            if name in self.histograms:
                self.series[name + "_bucket"] = {**labels, "le": None}
                self.series[name + "_sum"] = labels
                self.series[name + "_count"] = labels
            else:
                self.series[name] = labels

    def base(self, series):
        for h in self.histograms:
            if series in (h + "_bucket", h + "_sum", h + "_count"):
                return h
        return series

    def labels(self, series):
        return set(self.series[series])

    def values(self, series, label):
        """The values `label` of `series` can take, or None if not bounded."""
        return self.series.get(series, {}).get(label)


def load(valet):
    """Runs `valet metrics`; raises RuntimeError with its output if it fails."""
    try:
        out = subprocess.run(
            [valet, "metrics"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as e:
        raise RuntimeError(f"cannot run {valet} metrics: {e}") from e
    if out.returncode != 0:
        raise RuntimeError(f"{valet} metrics failed: {out.stderr.strip()}")
    return Contract(json.loads(out.stdout))
