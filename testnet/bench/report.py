#!/usr/bin/env python3
"""Report for testnet/bench/train-bench.sh (stdlib only).

Usage: report.py OUT_DIR
Reads OUT_DIR/meta.json (written by train-bench.sh: config, RTTs, eth0 tx_bytes per host and
process wall time per system), OUT_DIR/loom/progress-h*.jsonl (one per peer; h1 gives the loss
curve) and OUT_DIR/ddp/progress-h1.jsonl (rank 0). Writes OUT_DIR/result.json and
OUT_DIR/loss.svg (val loss vs wall time and vs tokens, both systems) and prints a table.

Per system: final val loss, tokens, wall_s (training clock of the progress file), time and
tokens to the target val loss (first eval at or below it; null if never), bytes sent per host
(eth0 tx_bytes, all traffic) and their mean, the dense-fp32 reference steps x 4 x params bytes per
peer (what shipping one fp32 gradient per optimizer step would send, before any all-reduce
factor), compute utilisation compute_s / wall_s. Then loom-vs-ddp ratios.
"""
import glob
import json
import math
import os
import sys


def die(msg):
    sys.exit(f"report: {msg}")


def read_jsonl(path):
    rows = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    die(f"{path}:{n}: not JSON")
    except OSError as e:
        die(f"cannot read {path}: {e.strerror}")
    return rows


def param_count(vocab, layers, width, context):
    c = width
    block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    return vocab * c + context * c + layers * block + 2 * c + c * vocab


def vocab_size(path):
    try:
        with open(path, encoding="utf-8") as f:
            return len(set(f.read()))
    except OSError as e:
        die(f"cannot read data file {path}: {e.strerror}")


def curve(rows, x_key):
    return [(r[x_key], r["val_loss"]) for r in rows
            if r.get("val_loss") is not None and not r.get("final") and r.get(x_key) is not None]


def summarise(name, rows_by_host, net, params, target):
    """rows_by_host: {host: [progress rows]}; the first host's file is the reference curve."""
    hosts = sorted(rows_by_host)
    main = rows_by_host[hosts[0]]
    if not main:
        die(f"{name}: empty progress file for {hosts[0]}")
    body = [r for r in main if not r.get("final")]
    final = next((r for r in reversed(main) if r.get("final")), body[-1])
    last = body[-1] if body else final
    evals = [r for r in body if r.get("val_loss") is not None]
    final_val = final.get("val_loss") if final.get("val_loss") is not None else (
        evals[-1]["val_loss"] if evals else None)
    hit = next((r for r in evals if r["val_loss"] <= target), None)
    wall = final.get("wall_s", last.get("wall_s"))
    tokens = final.get("tokens", last.get("tokens"))
    # Optimizer steps per peer: loom's "steps" (inner steps of this peer), ddp's "step".
    steps = last.get("steps", last.get("step"))
    util = []
    for h in hosts:
        rs = [r for r in rows_by_host[h] if r.get("compute_s") is not None and r.get("wall_s")]
        if rs:
            util.append(rs[-1]["compute_s"] / rs[-1]["wall_s"])
    out = {
        "final_val_loss": final_val,
        "tokens": tokens,
        "wall_s": wall,
        "process_wall_s": net.get("process_wall_s") if net else None,
        "optimizer_steps_per_peer": steps,
        "time_to_target_s": hit["wall_s"] if hit else None,
        "tokens_to_target": hit["tokens"] if hit else None,
        "compute_s": last.get("compute_s"),
        "comm_s": last.get("comm_s"),
        "compute_utilization": round(sum(util) / len(util), 4) if util else None,
        "compute_utilization_per_host": [round(u, 4) for u in util],
        "dense_fp32_bytes_per_peer": steps * 4 * params if steps else None,
    }
    if net:
        tx = net["tx_bytes"]
        out["bytes_sent_per_host"] = tx
        out["bytes_sent_per_peer_mean"] = sum(tx) / len(tx)
        if out["dense_fp32_bytes_per_peer"]:
            out["bytes_vs_dense_fp32"] = round(out["bytes_sent_per_peer_mean"] / out["dense_fp32_bytes_per_peer"], 6)
    if name == "loom":
        lasts = [next((r for r in reversed(rows_by_host[h]) if not r.get("final")), {}) for h in hosts]
        out["self_reported_bytes_sent_per_host"] = [r.get("bytes_sent") for r in lasts]
        # Cumulative dense-fp32 equivalent as the peer reports it (field name: either spelling).
        out["self_reported_bytes_dense_fp32_per_host"] = [
            r.get("dense_fp32_bytes", r.get("bytes_dense_fp32")) for r in lasts]
        hashes = {r.get("model_hash") for r in lasts}
        out["final_model_hashes_agree"] = len(hashes) == 1 and None not in hashes
        out["rounds"] = last.get("round")
        out["contributors_last_round"] = last.get("contributors")
    return out, {"time": curve(main, "wall_s"), "tokens": curve(main, "tokens")}


# --- SVG ----------------------------------------------------------------------------------------
COLORS = {"loom": "#d62728", "ddp": "#1f77b4"}


def nice_ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = int(lo / step) * step
    if start > lo:
        start -= step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks


def fmt_tick(v):
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def panel(x0, y0, w, h, series, xlabel, title, target):
    pts = [p for s in series.values() for p in s]
    parts = [f'<text x="{x0 + w / 2}" y="{y0 - 12}" text-anchor="middle" font-weight="bold">{title}</text>']
    if not pts:
        parts.append(f'<text x="{x0 + w / 2}" y="{y0 + h / 2}" text-anchor="middle">no data</text>')
        return parts
    xs = nice_ticks(0, max(p[0] for p in pts))
    ys_all = [p[1] for p in pts] + ([target] if target is not None else [])
    ys = nice_ticks(min(ys_all), max(ys_all))
    sx = lambda v: x0 + (v - xs[0]) / (xs[-1] - xs[0]) * w  # noqa: E731
    sy = lambda v: y0 + h - (v - ys[0]) / (ys[-1] - ys[0]) * h  # noqa: E731
    for t in xs:
        parts.append(f'<line x1="{sx(t):.1f}" y1="{y0}" x2="{sx(t):.1f}" y2="{y0 + h}" stroke="#eee"/>'
                     f'<text x="{sx(t):.1f}" y="{y0 + h + 16}" text-anchor="middle" font-size="11">{fmt_tick(t)}</text>')
    for t in ys:
        parts.append(f'<line x1="{x0}" y1="{sy(t):.1f}" x2="{x0 + w}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{x0 - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>')
    parts.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#333"/>')
    if target is not None:
        parts.append(f'<line x1="{x0}" y1="{sy(target):.1f}" x2="{x0 + w}" y2="{sy(target):.1f}" '
                     f'stroke="#777" stroke-dasharray="4 3"/><text x="{x0 + w - 4}" y="{sy(target) - 4:.1f}" '
                     f'text-anchor="end" font-size="10" fill="#555">target {target:g}</text>')
    for name, s in series.items():
        if not s:
            continue
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline points="{d}" fill="none" stroke="{COLORS[name]}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{COLORS[name]}"/>' for x, y in s]
    parts.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 36}" text-anchor="middle">{xlabel}</text>')
    parts.append(f'<text x="{x0 - 42}" y="{y0 + h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 {x0 - 42} {y0 + h / 2})">validation loss</text>')
    return parts


def write_svg(path, curves, target, subtitle):
    w, h = 1000, 420
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="13">', f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="12" fill="#444">{subtitle}</text>']
    parts += panel(80, 60, 380, 280, {k: v["time"] for k, v in curves.items()}, "wall time (s)",
                   "val loss vs wall time", target)
    parts += panel(580, 60, 380, 280, {k: v["tokens"] for k, v in curves.items()}, "tokens (all peers)",
                   "val loss vs tokens", target)
    for i, name in enumerate(curves):
        x = 380 + i * 140
        parts.append(f'<line x1="{x}" y1="{h - 22}" x2="{x + 24}" y2="{h - 22}" stroke="{COLORS[name]}" stroke-width="3"/>'
                     f'<text x="{x + 30}" y="{h - 18}">{name}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def ratio(a, b):
    return float(f"{a / b:.4g}") if a is not None and b not in (None, 0) else None


def main():
    if len(sys.argv) != 2:
        die("usage: report.py OUT_DIR")
    out_dir = sys.argv[1]
    meta_path = os.path.join(out_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        die(f"cannot read {meta_path}: {e}")
    m = meta["model"]
    params = param_count(vocab_size(meta["data"]), m["layers"], m["width"], m["context"])
    target = meta.get("target_loss")
    result = {"config": meta, "params": params, "systems": {}}
    curves = {}
    for name in ("loom", "ddp"):
        if meta.get(name) is None:
            continue
        files = sorted(glob.glob(os.path.join(out_dir, name, "progress-h*.jsonl")))
        rows = {os.path.basename(f)[len("progress-"):-len(".jsonl")]: read_jsonl(f) for f in files}
        rows = {h: r for h, r in rows.items() if r}
        if not rows:
            die(f"{name}: no progress in {os.path.join(out_dir, name)}")
        result["systems"][name], curves[name] = summarise(name, rows, meta[name], params, target)
    s = result["systems"]
    if "loom" in s and "ddp" in s:
        lo, dd = s["loom"], s["ddp"]
        result["loom_vs_ddp"] = {
            "speedup_to_target": ratio(dd["time_to_target_s"], lo["time_to_target_s"]),
            "wall_speedup": ratio(dd["wall_s"], lo["wall_s"]),
            "bytes_ratio": ratio(lo.get("bytes_sent_per_peer_mean"), dd.get("bytes_sent_per_peer_mean")),
            "final_loss_rel_diff": ratio(None if lo["final_val_loss"] is None or dd["final_val_loss"] is None
                                         else lo["final_val_loss"] - dd["final_val_loss"], dd["final_val_loss"]),
        }
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    sub = (f"{meta['hosts']} hosts, {meta['delay_ms_per_port']} ms/port ({2 * meta['delay_ms_per_port']} ms RTT), "
           f"{meta['rate_mbit']} Mbit/s; {params} params; loom {meta['rounds']} rounds x {meta['inner_steps']}, "
           f"ddp {meta['ddp_steps']} steps")
    write_svg(os.path.join(out_dir, "loss.svg"), curves, target, sub)

    def f(v, spec):
        return "-" if v is None else format(v, spec)
    print(f"{'system':<6} {'val_loss':>8} {'tokens':>9} {'wall_s':>8} {'t_target_s':>10} "
          f"{'MB/peer':>9} {'vs_dense':>9} {'util':>6}")
    for name, r in s.items():
        mb = r.get("bytes_sent_per_peer_mean")
        print(f"{name:<6} {f(r['final_val_loss'], '.4f'):>8} {f(r['tokens'], 'd'):>9} {f(r['wall_s'], '.1f'):>8} "
              f"{f(r['time_to_target_s'], '.1f'):>10} {f(mb / 1e6 if mb is not None else None, '.2f'):>9} "
              f"{f(r.get('bytes_vs_dense_fp32'), '.4f'):>9} {f(r['compute_utilization'], '.3f'):>6}")
    if "loom_vs_ddp" in result:
        c = result["loom_vs_ddp"]
        x = lambda v: "n/a" if v is None else f"{v:.4g}x"  # noqa: E731
        print(f"loom vs ddp: speedup to target {x(c['speedup_to_target'])}, wall {x(c['wall_speedup'])}, "
              f"bytes {x(c['bytes_ratio'])}, final val loss rel diff {f(c['final_loss_rel_diff'], '+.4f')}")
    print(f"wrote {os.path.join(out_dir, 'result.json')} and {os.path.join(out_dir, 'loss.svg')}")


if __name__ == "__main__":
    main()
