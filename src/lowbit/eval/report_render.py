"""report.md and report.html from the report dict (pure: strings in, strings out)."""

from __future__ import annotations

import html as _html

WORST_LAYERS = 8  # per checkpoint: the layers furthest above their 4^-b bound


def _f(value, fmt: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The main table: one row per model (the original first); Pareto members marked *."""
    front = set(report["pareto"]["perplexity"])
    orig_ppl = report["checkpoints"][0]["perplexity"]
    task_names = (report.get("tasks") or {}).get("tasks") or []
    head = ["model", "format", "method", "bits/w disk", "bits/w memory", "MiB disk", "MiB memory", "perplexity",
            "Δppl", "KL mean", "KL median", "KL p90", "KL p99", "KL max", "top-1"]
    head += [f"{t} acc" for t in task_names]
    head += ["decode tok/s (generate)", "decode tok/s (lowbit runtime)", "prefill tok/s", "quantize s",
             "quantize peak RSS MiB"]
    rows = []
    for r in report["checkpoints"]:
        kls = r.get("kl_stats") or {}
        stats = r.get("quantize_stats") or {}
        label = f"{r['label']} *" if r["label"] in front else r["label"]
        dppl = "–" if r["label"] == "original" else f"{(r['perplexity'] / orig_ppl - 1) * 100:+.1f}%"
        row = [label, r["format"], r.get("method") or "–", _f(r["bits_per_weight"], ".2f"),
               _f(r["bits_per_weight_memory"], ".2f"), _mib(r["size_bytes"]), _mib(r["memory_bytes"]),
               _f(r["perplexity"]), dppl, _f(r["kl"], ".4f"), _f(kls.get("median"), ".4f"), _f(kls.get("p90"), ".4f"),
               _f(kls.get("p99"), ".4f"), _f(kls.get("max"), ".3f"), _f(r["top1_agreement"])]
        for t in task_names:
            metrics = (r.get("tasks") or {}).get(t) or {}
            row.append(_f(metrics.get("acc"), ".3f"))
        row += [_f(r.get("decode_tokens_per_s"), ".1f"), _f(r.get("runtime_decode_tokens_per_s"), ".1f"),
                _f(r.get("prefill_tokens_per_s"), ".0f"),
                _f(stats.get("seconds"), ".1f"), _mib(stats.get("peak_rss_bytes"))]
        rows.append(row)
    return head, rows


def worst_layers(report: dict) -> dict[str, list[tuple[str, int, float, float]]]:
    """{checkpoint: [(layer, bits, error, error / bound)]}, the furthest above their bound first."""
    out = {}
    for label, entry in report["layer_errors"].items():
        items = [(n, v["bits"], v["rel_error"], v["rel_error"] / v["bound"]) for n, v in entry["layers"].items()]
        items.sort(key=lambda t: -t[3])
        out[label] = items[:WORST_LAYERS]
    return out


def notes(report: dict) -> list[str]:
    text = report["text"]
    lines = [f"Quality: held-out part of `{text['source']}` ({text['windows']} windows × {text['seq_len']} tokens, "
             f"{text['tokens']} predicted tokens), the same split as `lowbit eval`; KL is KL(original ‖ checkpoint) "
             "per token, its percentiles over all tokens as llama.cpp's KL report gives them. "
             "* marks the Pareto front of perplexity against bits per weight "
             f"(KL's front: {', '.join(report['pareto']['kl']) or '–'}).",
             "Bits per weight count the decoder blocks' Linears: on disk as lowbit stores the records (codes, "
             "fp16 scales and zeros, g_idx), in memory as the loaded kernels hold them."]
    speed = report.get("speed")
    if speed:
        lines.append(f"Speed: batch 1, greedy {speed['decode_tokens']} new tokens after a {speed['prompt_tokens']}-token "
                     f"prompt (plain `generate()`), prefill of {speed['prefill_tokens']} tokens, {speed['threads']} "
                     f"threads; wall clock, 1-minute load average {speed['load_average']:.2f} on {speed['cores']} cores"
                     + (" — the machine was busy, so these figures measure the competition too." if speed["busy"]
                        else "."))
    else:
        lines.append("Speed: not measured (--no-speed).")
    tasks = report.get("tasks")
    if tasks:
        if tasks["scorer"] == "lm-eval":
            lines.append(f"Tasks: lm-eval {', '.join(tasks['tasks'])} through its Python API "
                         f"(limit {tasks['limit']} documents each).")
        else:
            lines.append(f"Tasks: {tasks['why']}: {tasks['questions']} questions of {tasks['choices']} choices "
                         f"({', '.join(tasks['tasks'])}); acc picks the highest summed log-likelihood.")
        if tasks.get("unavailable"):
            lines.append("lm-eval tasks not run: " + "; ".join(f"{k} ({v})" for k, v in tasks["unavailable"].items()))
    lines.append("Quantize time and peak RSS: as recorded in the checkpoint (`lowbit quantize --record-stats`), "
                 "else –.")
    for label, entry in report["layer_errors"].items():
        if entry.get("note"):
            lines.append(f"Per-layer error of {label}: {entry['note']}.")
    lines.append(f"Seed {report['seed']}; lowbit {report['lowbit_version']}, torch {report['environment']['torch']}.")
    return lines


def markdown(report: dict) -> str:
    head, rows = summary_rows(report)
    out = [f"# lowbit report: {report['original']}", "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [""] + [f"- {line}" for line in notes(report)] + [""]
    for name in report.get("figures", {}).values():
        out += [f"![{name}]({name})", ""]
    out += ["## Layers furthest above their 4^-b bound", ""]
    for label, items in worst_layers(report).items():
        if not items:
            continue
        out += [f"**{label}**", "", "| layer | bits | rel. error | × bound |", "|---|---:|---:|---:|"]
        out += [f"| {n} | {b} | {e:.5f} | {ratio:.2f} |" for n, b, e, ratio in items]
        out.append("")
    return "\n".join(out)


def html(report: dict) -> str:
    esc = _html.escape
    head, rows = summary_rows(report)
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>",
             f"<title>lowbit report: {esc(report['original'])}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child,th:first-child,td:nth-child(2),td:nth-child(3){text-align:left}"
             "img{max-width:100%;margin:1em 0}</style></head><body>",
             f"<h1>lowbit report: {esc(report['original'])}</h1>", "<table>",
             "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table><ul>")
    parts += [f"<li>{esc(line)}</li>" for line in notes(report)]
    parts.append("</ul>")
    for name in report.get("figures", {}).values():
        parts.append(f"<img src='{esc(name)}' alt='{esc(name)}'>")
    parts.append("<h2>Layers furthest above their 4^-b bound</h2>")
    for label, items in worst_layers(report).items():
        if not items:
            continue
        parts += [f"<h3>{esc(label)}</h3>", "<table><tr><th>layer</th><th>bits</th><th>rel. error</th>"
                                            "<th>× bound</th></tr>"]
        parts += [f"<tr><td>{esc(n)}</td><td>{b}</td><td>{e:.5f}</td><td>{ratio:.2f}</td></tr>"
                  for n, b, e, ratio in items]
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
