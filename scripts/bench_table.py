#!/usr/bin/env python3
"""Prints the one table of BENCHMARKS.md from a `scripts/bench` run: criterion medians from
target/criterion, and the lines the wire, soak and memory runs printed (saved in the log dir).
Every ratio is of two figures from the same run."""
import json
import re
import sys
from pathlib import Path

logs = Path(sys.argv[1] if len(sys.argv) > 1 else "target/bench")
criterion = Path("target/criterion")
rows = []


def median_ns(bench):
    path = criterion / bench / "new" / "estimates.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["median"]["point_estimate"]


def ns(value):
    return "n/a" if value is None else (f"{value / 1000:.2f} µs" if value >= 1000 else f"{value:.0f} ns")


def verdict(ok):
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def log(name):
    path = logs / f"{name}.txt"
    return path.read_text() if path.exists() else ""


cached, uncached = median_ns("engine_classify_whole_internet"), median_ns("engine_classify_whole_internet_uncached")
rows.append(("in-process decision (lookup + classify + id), compiled lookup", ns(cached), "≤ 1 µs median",
             verdict(None if cached is None else cached <= 1000)))
rows.append(("in-process decision, the readers alone (no compiling, no cache)", ns(uncached), "", "measured"))
body = median_ns("engine_classify_rpc_body_uncached")
rows.append(("in-process Classify body: decode + decision + response + encode, uncached", ns(body), "",
             "measured"))
raw, combined = median_ns("geo_fixture_raw_three_lookups"), median_ns("geo/fixture_city_anon_asn_uncached")
if raw and combined:
    rows.append(("uncached lookup (location + anonymous + ASN) / the three raw lookups",
                 f"{ns(combined)} / {ns(raw)} = {combined / raw:.2f}×", "≤ 3×", verdict(combined / raw <= 3)))
small, large = median_ns("classify_by_policy_entries/17"), median_ns("classify_by_policy_entries/5000")
if small and large:
    mid = median_ns("classify_by_policy_entries/100")
    rows.append(("classify at 17 / 100 / 5,000 policy list entries",
                 f"{ns(small)} / {ns(mid)} / {ns(large)}: {large / small:.2f}×", "≤ 2×", verdict(large / small <= 2)))
by_entries = [median_ns(f"geo_cached_by_entries/{n}") for n in (1000, 100000, 1000000)]
if all(by_entries):
    rows.append(("cached lookup, cache of 1k / 100k / 1M networks (uniform access)",
                 " / ".join(ns(v) for v in by_entries), "", "measured"))
# Issue 16: the compiled tables against the cache and the readers, same run.
compiled = [median_ns(f"geo_compiled_by_entries/{n}") for n in (1000, 100000, 1000000)]
readers = [median_ns(f"geo_uncached_by_entries/{n}") for n in (1000, 100000, 1000000)]
if all(compiled):
    rows.append(("compiled lookup over 1k / 100k / 1M networks (uniform access)",
                 " / ".join(ns(v) for v in compiled), "≤ 200 ns at 1M", verdict(compiled[2] <= 200)))
if all(readers):
    rows.append(("readers alone over 1k / 100k / 1M networks (uniform access)",
                 " / ".join(ns(v) for v in readers), "", "measured"))
hot = {name: median_ns(f"geo/{name}_compiled") for name in
       ("whole_internet_country", "fixture_city_anon_asn", "maxmind_city_anon")}
hot = {k: v for k, v in hot.items() if v}
if hot:
    rows.append(("compiled lookup, hot: " + " / ".join(k.replace("_", " ") for k in hot),
                 " / ".join(ns(v) for v in hot.values()), "≤ 100 ns", verdict(max(hot.values()) <= 100)))
for name, networks, ms, per_network in re.findall(
        r"^compiled: (.*?): (\d+) networks, opened and compiled in (\d+) ms: .*?= ([\d.]+) B per network",
        log("decide"), re.M):
    rows.append((f"compiling the {name}", f"{int(networks):,} networks in {ms} ms, {per_network} B per network",
                 "", "measured"))
per_entry = re.findall(r"memory: prefix cache, (\d+) buckets.*?, (\d+) B per entry", log("decide"))
if per_entry:
    rows.append(("resident bytes per cache entry", " / ".join(f"{b} B at {int(n):,}" for n, b in per_entry), "",
                 "measured"))

wire = {}
for call, in_flight, rate, p50, p99, errors in re.findall(
        r"^\| (Health/Check \(echo\)|Classifier/Classify) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$",
        log("wire"), re.M):
    wire[(call.split("/")[0], int(in_flight))] = (float(rate), float(p99), int(errors))
for in_flight in (1, 64):
    echo, classify = wire.get(("Health", in_flight)), wire.get(("Classifier", in_flight))
    if not (echo and classify):
        continue
    throughput, p99 = classify[0] / echo[0], classify[1] / echo[1]
    rows.append((f"Classify / echo throughput, {in_flight} in flight",
                 f"{classify[0]:,.0f} / {echo[0]:,.0f} calls/s = {throughput:.2f}",
                 "≥ 0.85" if in_flight == 64 else "", verdict(throughput >= 0.85) if in_flight == 64 else "measured"))
    rows.append((f"Classify / echo p99, {in_flight} in flight",
                 f"{classify[1]:.0f} / {echo[1]:.0f} µs = {p99:.2f}", "≤ 1.2", verdict(p99 <= 1.2)))

# Issue 16: the realistic mix (benches/mix.rs), this generator's tables, store off then on.
mix = {}
for section in re.split(r"^(?=store (?:off|on))", log("mix"), flags=re.M):
    head = " ".join(section.split()[:2]).rstrip(",")
    if "64 in flight" not in section.split("\n", 1)[0]:
        continue
    for call, ratio, p99 in re.findall(r"^\| (\([a-e]\)[^|]*?) \| \d+ \| \d+ \| [\d.]+ \| ([\d.]+) \([^)]*\) \| ([\d.]+) \|$",
                                       section, re.M):
        mix[(head, call[:3])] = (float(ratio), float(p99))
for (call, name, floor, p99_cap) in (("(b)", "API request with usage history", 0.85, 1.2),
                                      ("(c)", "signup with a full account", 0.75, None),
                                      ("(d)", "Envoy Check with headers", 0.8, None)):
    got = mix.get(("store off", call))
    if got:
        rows.append((f"mix {call} {name} / health check, 64 in flight (store off)", f"{got[0]:.2f}",
                     f"≥ {floor}", verdict(got[0] >= floor)))
        if p99_cap:
            rows.append((f"mix {call} p99 / health check p99", f"{got[1]:.2f}", f"≤ {p99_cap}",
                         verdict(got[1] <= p99_cap)))
got = mix.get(("store on", "(b)"))
if got:
    rows.append(("mix (b) / health check, store on (ALLOW rows asynchronous)", f"{got[0]:.2f}", "≥ 0.8",
                 verdict(got[0] >= 0.8)))
for bench, name, cap in (("engine_api_request_with_history", "(b)", 1000), ("engine_signup_full_account", "(c)", 3000)):
    value = median_ns(bench)
    if value is not None:
        rows.append((f"in-process whole decision, {name}", ns(value), f"≤ {ns(cap)}", verdict(value <= cap)))

durable = {}
for name, rate, p50, p99, cpu, errors in re.findall(
        r"^\| (no store|store, recorded asynchronously|store, must-record waits \(as shipped\)) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| (\d+) \|$",
        log("durability"), re.M):
    durable[name.split(",")[0] if name == "no store" else name] = (float(rate), float(p50), float(p99), float(cpu))
ratios = re.search(r"must-record / no store throughput: ([\d.]+); must-record / asynchronous store: ([\d.]+)", log("durability"))
wait = durable.get("store, must-record waits (as shipped)")
if wait and ratios:
    rows.append(("signup Classify with must-record waits, 64 in flight: p50 / p99",
                 f"{wait[1]:.0f} / {wait[2]:.0f} µs", "p99 ≤ 2 ms", verdict(wait[2] <= 2000)))
    rows.append(("signup throughput, must-record waits / asynchronous store (and / no store)",
                 f"{float(ratios.group(2)):.2f} ({float(ratios.group(1)):.2f})", "≥ 0.7",
                 verdict(float(ratios.group(2)) >= 0.7)))

gate = re.search(r"gateway: regionguard ([\d.]+)x the auth_request ceiling's rate \(target >= 0.8\), p99 ([\d.]+)x",
                 log("gateways"))
if gate:
    rate, p99 = float(gate.group(1)), float(gate.group(2))
    rows.append(("nginx + regionguard forward-auth / nginx + auth_request 204, requests/s (wrk, 64 connections)",
                 f"{rate:.2f}", "≥ 0.8", verdict(rate >= 0.8)))
    rows.append(("nginx + regionguard forward-auth / nginx + auth_request 204, p99", f"{p99:.2f}", "≤ 1.3",
                 verdict(p99 <= 1.3)))

soak = re.search(r"soak: ([\d.]+) min, (\d+) calls.*?, (\d+) errors, (\d+) policy\+database swaps, "
                 r"server RSS (\d+) KiB -> (\d+) KiB", log("soak"))
if soak:
    minutes, calls, errors, swaps, start, end = soak.groups()
    rows.append((f"soak, {minutes} min of mixed traffic, {swaps} policy + database swaps",
                 f"{int(calls):,} calls, {errors} errors", "0 errors", verdict(int(errors) == 0)))
    rows.append(("soak, server resident memory", f"{int(start) / 1024:.1f} → {int(end) / 1024:.1f} MiB", "",
                 "measured"))

for name, decisions, p50, p99, target in re.findall(
        r"console: (.+?) over (\d+) decisions: p50 ([\d.]+) ms, p99 ([\d.]+) ms( \(target p99 <= 200 ms\))?",
        log("console")):
    rows.append((f"console page render, {name}, store of {int(decisions):,} decisions: p50 / p99",
                 f"{float(p50):.1f} / {float(p99):.1f} ms", "p99 ≤ 200 ms" if target else "",
                 verdict(float(p99) <= 200) if target else "measured"))

print("| check | measured (same run) | target | result |")
print("| --- | --- | --- | --- |")
for row in rows:
    print("| " + " | ".join(row) + " |")
