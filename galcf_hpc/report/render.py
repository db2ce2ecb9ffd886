"""The report's page and its terminal summary, both from the report's numbers (the dict
written to report.json). The page is a jinja2 template with autoescaping: nothing taken
from a run (paths, keys, class or judge names) can inject markup into it."""

import math
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = "report.html.j2"
DASH = "\u2013"


def num(x, digits=3):
    """A number for the page: ``digits`` decimals (scientific below that), a dash for
    missing or non-finite values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 10**-digits or x == 0 else f"{x:.2e}"
    return str(x)


def validity_columns(rep):
    """(key, heading, role) of every validity column: the model, each judge, the panel."""
    j = rep["judges"]
    cols = [("validity_model", "model", "trained against")]
    cols += [
        (f"validity_{n}", n, "judge, luminance only" if n in j["luminance_only"] else "judge, colour")
        for n in j["names"]
    ]
    if j["names"]:
        cols += [
            ("validity_panel", "panel mean", "judged by"),
            ("panel_all", "all judges", "judged by"),
            ("panel_majority", "majority", "judged by"),
            # the judges on what the counterfactual grid shows, the input with the change applied
            ("overlay_validity_panel", "panel on x + (x_cf - x~)", "judged by"),
        ]
    return cols


def _environment():
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = num
    return env


def render_html(rep):
    """The report page (str) of a report dict."""
    return _environment().get_template(TEMPLATE).render(r=rep, columns=validity_columns(rep), dash=DASH)


def summary_lines(rep):
    """What ``galcf-hpc report`` prints: accuracy, validity by the model next to every
    judge's, the luminance share, separation, notes and where the files are."""
    m, o, j = rep["classification"]["model"], rep["counterfactuals"]["overall"], rep["judges"]
    grey = set(j["luminance_only"])

    def judge(n):
        return f"{n}{' (luminance only)' if n in grey else ''}"

    accs = ", ".join(f"{judge(n)} {num(c['accuracy'])}" for n, c in rep["classification"]["judges"].items())
    lines = [f"{rep['split']}: model accuracy {num(m['accuracy'])}" + (f"; judges: {accs}" if accs else "")]
    on_recon = rep["classification"].get("judges_on_reconstructions", {})
    if on_recon:
        lines.append(
            "judges on the reconstructions x~ (what a counterfactual can show them at most): "
            + ", ".join(f"{judge(n)} {num(c['accuracy'])}" for n, c in on_recon.items())
        )
    line = f"counterfactual validity: by the model {num(o['validity_model'])} (trained against)"
    if j["names"]:
        line += (
            "; judged by "
            + ", ".join(f"{judge(n)} {num(o[f'validity_{n}'])}" for n in j["names"])
            + f"; panel mean {num(o['validity_panel'])}, all {num(o['panel_all'])}, majority "
            f"{num(o['panel_majority'])}"
        )
        if o.get("overlay_validity_panel") is not None:
            line += f"; on the grid's overlays x + (x_cf - x~) panel mean {num(o['overlay_validity_panel'])}"
    else:
        line += "; judged by: no judges"
    lines.append(line)
    lines.append(f"luminance share of the change x_cf - x~: {num(o['luminance_share'])} (0 = pure recolouring)")
    lines.append(
        "silhouette by class (original space / t-SNE): "
        + ", ".join(f"{k} {num(v['original'])}/{num(v['tsne'])}" for k, v in rep["silhouette"].items())
    )
    ml = rep.get("mislabels")
    if ml:
        line = (
            f"mislabel candidates: the model disagrees with the catalogue label of {ml['num_disagreeing']} of "
            f"{ml['num_galaxies']} {ml['split']} galaxies"
        )
        ev = ml["evaluation"]
        if ev:
            line += (
                f"; {ev['num_wrong']} planted wrong labels: ROC AUC {num(ev['roc_auc'])}, precision at k={ev['k']} "
                f"{num(ev['precision_at_k'])} (chance {num(ev['chance'])})"
            )
        lines.append(line)
    if j["note"]:
        lines.append(f"note: {j['note']}")
    p = rep["paths"]
    lines.append(f"report: {Path(p['html']).resolve()}  (numbers: {Path(p['json']).resolve()})")
    return lines
