"""Turn one bench run's figures into the markdown tables of bench/README.md.

Medians over the run's rounds; ratios only between medians of the same run.
A system with any INVALID round (lost or duplicated mail, an error reply)
shows INVALID instead of a number, and no ratio is computed from it.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import Results

WORKLOADS = ("1 rcpt", "5 rcpt")


def _median_rate(results: Results, key: str, workload: str) -> float | None:
    runs = [r for r in results.runs if r.system == key and r.workload == workload]
    if not runs or any(r.rate is None for r in runs):
        return None
    return statistics.median(r.rate for r in runs if r.rate is not None)


def _median_cpu(results: Results, key: str, workload: str) -> float | None:
    cpu = [
        r.cpu_ms
        for r in results.runs
        if r.system == key and r.workload == workload and r.cpu_ms is not None
    ]
    return statistics.median(cpu) if cpu else None


def _invalid_reason(results: Results, key: str, workload: str) -> str:
    bad = [r.error for r in results.runs if r.system == key and r.workload == workload and r.error]
    return bad[0] if bad and bad[0] else ""


def better_haraka(
    results: Results,
    nodes: int,
    workload: str,
    headers: bool = False,
    by: str = "rate",
    full: bool = False,
) -> str | None:
    """The key of the better Haraka variant (Nagle as shipped, or TCP_NODELAY).

    Better is the higher median rate (``by="rate"``) or the lower median CPU per message
    (``by="cpu"``). ``full``: the variants that verify SPF and DKIM (Haraka-full).
    """
    base = f"hk-n{nodes}{'-full' if full else '-headers' if headers else ''}"
    keys = (base, f"{base}-nodelay")
    if by == "cpu":
        cpu = {k: v for k in keys if (v := _median_cpu(results, k, workload)) is not None}
        return min(cpu, key=lambda k: cpu[k]) if cpu else None
    rates = {k: v for k in keys if (v := _median_rate(results, k, workload)) is not None}
    return max(rates, key=lambda k: rates[k]) if rates else None


def _ratio(
    results: Results, num: str | None, den: str | None, workload: str, by: str
) -> float | None:
    """num/den of the median rates; or, by CPU, den's CPU per message over num's."""
    if num is None or den is None:
        return None
    if by == "cpu":
        a, b = _median_cpu(results, den, workload), _median_cpu(results, num, workload)
    else:
        a, b = _median_rate(results, num, workload), _median_rate(results, den, workload)
    return a / b if a and b else None


def _fmt(value: float | None, spec: str = ".0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


Row = tuple[str, list[float | None], str, float | None]


def ratio_rows(results: Results, by: str = "rate") -> list[Row]:
    """(what, [ratio per workload], target text, target minimum), from rates or CPU."""
    rows: list[Row] = []

    def row(what: str, num: str, den: object, target: str, minimum: float | None) -> None:
        values = []
        for w in WORKLOADS:
            d = den(w) if callable(den) else den
            values.append(_ratio(results, num, d, w, by) if isinstance(d, str) else None)
        rows.append((what, values, target, minimum))

    row("mailgate default w1 / better Haraka nodes 0", "mg-default-w1",
        lambda w: better_haraka(results, 0, w, by=by), ">= 1.5", 1.5)  # fmt: skip
    row("mailgate default w2 / better Haraka nodes 2", "mg-default-w2",
        lambda w: better_haraka(results, 2, w, by=by), ">= 1.5", 1.5)  # fmt: skip
    row("mailgate default w1 / naive relay", "mg-default-w1", "naive", ">= 0.85", 0.85)
    row("mailgate full w1 / better Haraka-full nodes 0", "mg-full-w1",
        lambda w: better_haraka(results, 0, w, by=by, full=True), ">= 1.5", 1.5)  # fmt: skip
    row("mailgate full w2 / better Haraka-full nodes 2", "mg-full-w2",
        lambda w: better_haraka(results, 2, w, by=by, full=True), ">= 1.5", 1.5)  # fmt: skip
    if by == "rate":
        row("mailgate default w2 / direct", "mg-default-w2", "direct", ">= 0.35", 0.35)
    row("mailgate full w1 / mailgate default w1", "mg-full-w1", "mg-default-w1", "(info)", None)
    row("mailgate full w2 / mailgate full w1", "mg-full-w2", "mg-full-w1", "(info)", None)
    row("mailgate full w1 / better Haraka + headers", "mg-full-w1",
        lambda w: better_haraka(results, 0, w, headers=True, by=by), "(info)", None)  # fmt: skip
    row("mailgate default w2 / mailgate default w1", "mg-default-w2", "mg-default-w1",
        "(info)", None)  # fmt: skip
    if by == "rate":
        row("mailgate default w1 / direct", "mg-default-w1", "direct", "(info)", None)
        row("naive relay / direct", "naive", "direct", "(info)", None)
        row("HAProxy TCP pass-through / direct", "haproxy-tcp", "direct", "(info)", None)
    return rows


def _ratio_table(results: Results, by: str) -> list[str]:
    out = ["| ratio | 1 rcpt | 5 rcpt | target | met |", "|---|---|---|---|---|"]
    for what, values, target, minimum in ratio_rows(results, by):
        met = "-"
        if minimum is not None and all(v is not None for v in values):
            met = "yes" if all(v is not None and v >= minimum for v in values) else "NO"
        shown = " | ".join(_fmt(v, ".2f") for v in values)
        out.append(f"| {what} | {shown} | {target} | {met} |")
    return out


def _load_sections(results: Results) -> list[str]:
    """The throughput, ratio and latency tables."""
    out: list[str] = []
    out += ["### Throughput (messages/s, median of the rounds; CPU ms per message)", ""]
    out.append("| system | processes | 1 rcpt msg/s | CPU ms/msg | 5 rcpt msg/s | CPU ms/msg |")
    out.append("|---|---|---|---|---|---|")
    for key, info in results.systems.items():
        cells = []
        for w in WORKLOADS:
            rate = _median_rate(results, key, w)
            cells.append(_fmt(rate) if rate is not None else "INVALID")
            cells.append(_fmt(_median_cpu(results, key, w), ".2f"))
        out.append(f"| {info['label']} | {info['processes']} | " + " | ".join(cells) + " |")
    invalid = [
        f"- {key} {w}: INVALID: {_invalid_reason(results, key, w)}"
        for key in results.systems
        for w in WORKLOADS
        if _invalid_reason(results, key, w)
    ]
    if invalid:
        out += ["", "Invalid runs:", *invalid]
    out += ["", "### Ratios of throughput (same run, medians of msg/s)", ""]
    out += _ratio_table(results, "rate")
    out += ["", "### Ratios of CPU per message (same run, medians)", "",
            "Other load on the machine barely moves these: the other system's CPU ms/msg"
            " over mailgate's.", ""]  # fmt: skip
    out += _ratio_table(results, "cpu")
    better = []
    for full in (False, True):
        for nodes in (0, 2):
            for w in WORKLOADS:
                best = better_haraka(results, nodes, w, full=full)
                if best:
                    what = f"{'Haraka-full ' if full else ''}nodes {nodes}, {w}"
                    better.append(f"{what}: {results.systems[best]['label']}")
    if better:
        out += ["", "The better Haraka variant: " + "; ".join(better) + "."]
    out += _machine_table(results)
    out += ["", "### Latency: one sequential client, one session per message (ms)", ""]
    out.append(
        "| system | messages | mean | p50 | p99 | added mean | added p50 | added p99 "
        "| added p99, paired |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    direct = results.latency.get("direct")
    for key, lat in results.latency.items():
        added = ["-", "-", "-"]
        if direct and key != "direct":
            added = [f"{lat[s] - direct[s]:+.2f}" for s in ("mean", "p50", "p99")]
        paired = lat.get("added_p99_paired")
        added.append(f"{paired:+.2f}" if paired is not None else "-")
        out.append(
            f"| {results.systems[key]['label']} | {lat['messages']:.0f} | {lat['mean']:.2f} | "
            f"{lat['p50']:.2f} | {lat['p99']:.2f} | " + " | ".join(added) + " |"
        )
    out += ["", "Added p99, paired: the 99th percentile of (this system's time - the direct "
            "time) over the messages, message n of each sent one after the other."]  # fmt: skip
    return out


def _machine_table(results: Results) -> list[str]:
    """The machine's CPU during each system's throughput runs (medians of the rounds)."""
    if not any(r.machine for r in results.runs):
        return []
    out = ["", "### The machine's CPU during the throughput runs (% of all cores, medians)", "",
           "user / system / softirq / idle. Loopback TCP work done in softirq context is in"
           " no process's CPU ms/msg above; idle near 10 % or less means the machine is full.",
           "", "| system | 1 rcpt | 5 rcpt |", "|---|---|---|"]  # fmt: skip
    kinds = ("user", "system", "softirq", "idle")
    for key, info in results.systems.items():
        cells = []
        for w in WORKLOADS:
            shares = [r.machine for r in results.runs if r.system == key and r.workload == w]
            shares = [m for m in shares if m]
            medians = (f"{statistics.median(m[k] for m in shares):.0f}" for k in kinds)
            cells.append(" / ".join(medians) if shares else "-")
        out.append(f"| {info['label']} | " + " | ".join(cells) + " |")
    return out


def render(results: Results) -> str:
    """The whole report as markdown."""
    out: list[str] = ["## Results", ""]
    out.append("Machine: " + "; ".join(f"{k}: {v}" for k, v in results.machine.items()) + ".")
    out.append("")
    out.append("Settings: " + "; ".join(f"{k}: {v}" for k, v in results.settings.items()) + ".")
    out.append("")
    if results.runs or results.latency:  # not with --memory-only
        out += _load_sections(results)
    if results.memory:
        out += ["", "### Memory (RSS of the system's processes, MiB unless noted)", ""]
        out.append(
            "| system | baseline | with idle connections | KiB per idle connection "
            "| peak, concurrent big messages | peak / bytes in flight |"
        )
        out.append("|---|---|---|---|---|---|")
        for key, m in results.memory.items():
            idle = m.get("idle_kb")
            per = m.get("per_idle_kb")
            peak = m.get("big_peak_kb")
            big = "INVALID: " + str(m["big_error"]) if m.get("big_error") else _mib(peak)
            per_text = _fmt(per if isinstance(per, float) else None, ".1f")
            if isinstance(per, float) and per < 0:
                per_text = "n/a (the heap shrank meanwhile: GC)"
            ratio = m.get("big_ratio")
            base = m.get("baseline_kb", m.get("big_before_kb"))  # --memory-only: before the load
            out.append(
                f"| {results.systems[key]['label']} | {_mib(base)} | "
                f"{_mib(idle) if idle is not None else m.get('idle_error', '-')} | "
                f"{per_text} | {big} | {_fmt(ratio if isinstance(ratio, float) else None, '.2f')} |"
            )
    out += ["", "### Targets", ""]
    out += _targets(results)
    notes = list(results.notes)
    for key, info in results.systems.items():
        notes += [f"{key}: {n}" for n in info["notes"]]  # type: ignore[attr-defined]
    if notes:
        out += ["", "### Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(out) + "\n"


def _mib(kb: object) -> str:
    return f"{kb / 1024:.1f}" if isinstance(kb, int | float) else "-"


def _targets(results: Results) -> list[str]:
    lines = []
    for by, view in (("rate", "throughput"), ("cpu", "CPU per message")):
        for what, values, target, minimum in ratio_rows(results, by) if results.runs else []:
            if minimum is None:
                continue
            shown = ", ".join(_fmt(v, ".2f") for v in values)
            ok = all(v is not None and v >= minimum for v in values)
            lines.append(f"- {what} {target} ({view}): {shown} -> {'met' if ok else 'MISSED'}")
    lat, direct = results.latency.get("mg-default-w1"), results.latency.get("direct")
    if lat and direct:
        paired = lat.get("added_p99_paired")
        added, how = (paired, "paired") if paired is not None else (lat["p99"] - direct["p99"], "")
        lines.append(
            f"- added p99 latency < 3 ms{f' ({how})' if how else ''}: {added:+.2f} ms -> "
            f"{'met' if added < 3 else 'MISSED'}"
        )
    cpu = _median_cpu(results, "mg-default-w1", "1 rcpt")
    if cpu is not None:
        lines.append(
            f"- gateway CPU <= 0.8 ms/msg (default policy, 1 rcpt): {cpu:.2f} ms -> "
            f"{'met' if cpu <= 0.8 else 'MISSED'}"
        )
    cpu = _median_cpu(results, "mg-full-w1", "1 rcpt")
    if cpu is not None:
        lines.append(
            f"- gateway CPU <= 1.0 ms/msg (full policy, 1 rcpt): {cpu:.2f} ms -> "
            f"{'met' if cpu <= 1.0 else 'MISSED'}"
        )
    mem = results.memory.get("mg-default-w1", {})
    per = mem.get("per_idle_kb")
    if isinstance(per, float):
        lines.append(
            f"- RSS <= 30 KiB per idle connection: {per:.1f} KiB -> "
            f"{'met' if per <= 30 else 'MISSED'}"
        )
    ratio = mem.get("big_ratio")
    if isinstance(ratio, float) and not mem.get("big_error"):
        lines.append(
            f"- peak RSS <= 1.3 x bytes in flight (concurrent big messages): {ratio:.2f} -> "
            f"{'met' if ratio <= 1.3 else 'MISSED'}"
        )
    return lines


def main() -> None:
    """``python -m bench.report RESULTS.json``: print the tables of a saved run again."""
    import json
    import sys
    from pathlib import Path

    from bench.run import LoadRun, Results

    data = json.loads(Path(sys.argv[1]).read_text())
    data["runs"] = [LoadRun(**r) for r in data["runs"]]
    print(render(Results(**data)))


if __name__ == "__main__":
    main()
