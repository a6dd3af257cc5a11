"""One page (Markdown and HTML) with the last result of every suite in a results folder."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

from .suites import SUITES, status_line, table_markdown, table_rows


def collect_results(results: str | Path) -> dict[str, dict]:
    """``{suite: result document}`` from ``<results>/<suite>/result.json`` (the last run of each suite)."""
    out = {}
    for name in SUITES:
        f = Path(results) / name / "result.json"
        if f.is_file():
            out[name] = json.loads(f.read_text())
    return out


def _html_table(doc: dict) -> str:
    if doc.get("status") != "ok":
        return f"<p>{html.escape(status_line(doc))}</p>"
    header, rows = table_rows(doc)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(results: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out`` (default: the results folder).

    Returns the two paths. Suites that never ran are listed as such.
    """
    results = Path(results)
    out = Path(out) if out else results
    out.mkdir(parents=True, exist_ok=True)
    docs = collect_results(results)
    md = ["# microsnoop-ray evaluation report", ""]
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>microsnoop-ray evaluation</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
         "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:360px;margin:4px}</style>",
         "</head><body><h1>microsnoop-ray evaluation report</h1>"]
    card = next((d["model_card"] for d in docs.values() if d.get("model_card")), None)
    mach = next((d["machine"] for d in docs.values() if d.get("machine")), None)
    if card:
        rows = [(k, v) for k, v in card.items() if not isinstance(v, (dict, list))]
        md += ["## Weights (model card)", "", "| field | value |", "|---|---|"]
        md += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows] + [""]
        h += ["<h2>Weights (model card)</h2><table>"] + [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}"
                                                        f"</td></tr>" for k, v in rows] + ["</table>"]
    if mach:
        md += ["## Machine", "", ", ".join(f"{k}: {v}" for k, v in mach.items()), ""]
        h += ["<h2>Machine</h2><p>" + html.escape(", ".join(f"{k}: {v}" for k, v in mach.items())) + "</p>"]
    for name in SUITES:
        md += [f"## {name}", ""]
        h += [f"<h2>{html.escape(name)}</h2>"]
        doc = docs.get(name)
        if doc is None:
            md += ["not run yet (`microsnoop-ray evaluate suite " + name + "`)", ""]
            h += ["<p>not run yet</p>"]
            continue
        info = f"run {doc.get('started')}, {doc.get('seconds')} s; data: {json.dumps(doc.get('data', {}))}"
        table = table_markdown(doc)
        md += [info, "", table, ""]
        h += [f"<p>{html.escape(info)}</p>", _html_table(doc)]
        for fig in doc.get("figures", []):
            rel = os.path.relpath(results / name / fig, out)
            md += [f"![{fig}]({rel})"]
            h += [f"<img src='{html.escape(rel)}' alt='{html.escape(fig)}'>"]
        md += [""]
    h += ["</body></html>"]
    mdp, hp = out / "report.md", out / "report.html"
    mdp.write_text("\n".join(md))
    hp.write_text("\n".join(h))
    return mdp, hp
