"""The report folder of a profiling run: plate layout with cell counts, PCA of well profiles,
and the table of outputs (the pictures come from :mod:`microsnoop_ray.plots`)."""
from __future__ import annotations

import json
from pathlib import Path
import pandas as pd

from ..plots import pca_png, plate_layout_png
from .layout import WELL


def _num(v, fmt: str = ".3g") -> str:
    return "singular" if v is None else format(v, fmt)


def sphering_lines(sph: dict | None) -> list[str]:
    """Markdown for the sphering section: one row of diagnostics per fit, then its warnings."""
    if not sph:
        return ["Sphering: none.", ""]
    if not sph.get("applied"):
        return [f"Sphering: not applied ({sph.get('reason', 'not requested')}).", ""]
    lines = ["## Sphering", "", f"Requested scope {sph['scope_requested']}, fitted on control {sph['fit_on']}.", "",
             "| scope | group | controls | features | rank | effective rank | condition before | condition after "
             "| regularisation | epsilon |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f in sph["fits"]:
        lines.append(f"| {f['scope']} | {f['group'] or 'all'} | {f['n_controls']} | {f['n_features']} | {f['rank']} | "
                     f"{f['effective_rank']:.1f} | {_num(f['condition_number_before'])} | "
                     f"{_num(f['condition_number_after'])} | {f['regularization']} | "
                     f"{_num(f['epsilon']) if f['epsilon'] is not None else f['floor_rule']} |")
    warnings = [f["warning"] for f in sph["fits"] if f.get("warning")]
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]
    return lines + [""]


def evaluation_lines(ev: dict | None) -> list[str]:
    """Markdown for the run's own evaluation: copairs mAP per feature set and treatment."""
    if not ev:
        return []
    if not ev.get("applied"):
        return ["## Evaluation", "", f"Not applied: {ev.get('reason')}.", ""]
    lines = ["## Evaluation (copairs mAP)", "",
             f"Replicates: {ev['replicates']}s of each treatment ({', '.join(ev['treatment_keys'])}); recipe "
             f"{', '.join(ev['recipe']) or 'none'}. Activity: against the plate's negative controls; consistency: "
             "against the other treatments. Retrieved: corrected p < 0.05.", "",
             "| feature set | features | question | mean mAP | retrieved | per treatment (mAP, corrected p) |",
             "|---|---|---|---|---|---|"]
    for name, res in ev["feature_sets"].items():
        if not res.get("activity"):
            lines.append(f"| {name} | - | - | - | - | not applied: {res.get('reason')} |")
            continue
        for q in ("activity", "consistency"):
            r = res[q]
            if "mean_map" not in r:
                lines.append(f"| {name} | {res['features']} | {q} | - | - | {r.get('reason')} |")
                continue
            per = "; ".join(f"{' '.join(str(v) for k, v in t.items() if k.startswith('Metadata_'))}: "
                            f"{t['mAP']:.3f}, {t['corrected_p']:.2g}" for t in r["per_treatment"])
            lines.append(f"| {name} | {res['features']} | {q} | {r['mean_map']:.3f} | {r['fraction_retrieved']:.2f} "
                         f"| {per} |")
    return lines + [""]


def step_lines(steps: dict | None) -> list[str]:
    """Markdown for where the time went: worker seconds per site and step."""
    if not steps or not steps.get("sites"):
        return []
    lines = ["## Where the time goes", "", f"Worker seconds per site (mean of {steps['sites']} sites; steps run side "
             "by side on many workers).", "", "| " + " | ".join(steps["per_site"]) + " |",
             "|" + "---|" * len(steps["per_site"]), "| " + " | ".join(f"{v:.2f}" for v in steps["per_site"].values())
             + " |"]
    return lines + [""]


def write_run_report(out: str | Path, summary: dict, color_by: str | None = None, extra: dict | None = None) -> Path:
    """``report/``: one layout PNG per plate, a PCA PNG of all well profiles, ``README.md`` with the tables."""
    out = Path(out)
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    lines = ["# Profiling report", "", f"model: `{summary['model_id']}`", ""]
    wells_all = []
    skipped = pd.read_csv(out / "skipped.csv") if (out / "skipped.csv").exists() else pd.DataFrame()
    for o in summary["outputs"]:
        if o["level"] == WELL:
            wells = pd.read_parquet(out / o["path"])
            wells_all.append(wells)
            skip_wells = sorted(set(skipped.loc[skipped["Metadata_Plate"] == o["plate"], "Metadata_Well"])
                                - set(wells["Metadata_Well"])) if len(skipped) else []
            png = plate_layout_png(wells, rep / f"{o['plate']}_layout.png", f"{o['plate']}: cells per well",
                                   skip_wells)
            lines += [f"![{o['plate']} layout]({png.name})", ""]
    if wells_all and color_by:
        wells = pd.concat(wells_all, ignore_index=True)
        if color_by in wells and len(wells) >= 3:
            png = pca_png(wells, color_by, rep / "wells_pca.png",
                          f"PCA of {len(wells)} well profiles ({summary['model_id']})")
            lines += [f"![PCA of well profiles]({png.name})", ""]
    lines += ["## Plates", "", "| plate | batch | wells | sites | cells | sites skipped |", "|---|---|---|---|---|---|"]
    for p, s in summary["plates"].items():
        lines.append(f"| {p} | {s.get('batch', '')} | {s['wells']} | {s['sites']} | {s['cells']} | "
                     f"{s['sites_skipped']} |")
    lines += ["", "## Outputs", "", "| level | plate | rows | path |", "|---|---|---|---|"]
    for o in summary["outputs"]:
        lines.append(f"| {o['level']} | {o['plate']} | {o['rows']} | `{o['path']}` |")
    sph = summary.get("sphering")
    lines += ["", f"Aggregation: {summary['aggregation']}.", ""]
    for plate, c in (summary.get("constant_features") or {}).items():
        lines += [f"Constant features on plate {plate}: {c['n_features']}"
                  + (f" (empty channels: {', '.join(c['channels'])})" if c["channels"] else "")
                  + (" - dropped." if summary.get("dropped_constant_features") else
                     " - kept; `--drop-constant` removes them (pycytominer's spherize divides by their variance)."),
                  ""]
    lines += sphering_lines(sph)
    lines += evaluation_lines(summary.get("evaluation"))
    lines += step_lines((summary.get("this_run") or {}).get("step_seconds"))
    if len(skipped):
        lines += ["## Skipped", "", f"{len(skipped)} input(s); see `skipped.csv`.", ""]
    if extra:
        lines += ["## Measured", "", "```json", json.dumps(extra, indent=1), "```", ""]
    (rep / "README.md").write_text("\n".join(lines))
    return rep
