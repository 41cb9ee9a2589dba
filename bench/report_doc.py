"""The report's text: number formatting (significant digits, plurals) and a document of blocks rendered both as
Markdown (``report.md``) and as self-contained HTML (``report.html``, figures embedded as base64 PNG)."""
from __future__ import annotations

import base64
import html
import math
import string
from pathlib import Path

import numpy as np

__all__ = ["fmt", "fmt_time", "fmt_spread", "fmt_timed", "plural", "cell_name", "md_text", "Doc"]

TIME_DIGITS = 3  # wall-clock numbers: 3 significant digits (timing noise makes a 4th meaningless)


def fmt(v, digits: int = 4) -> str:
    """A table value: "–" for missing, yes/no, integers with thousands separators, floats to ``digits``
    significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer() and abs(v) < 1e6:
            return f"{int(v):,}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_time(seconds) -> str:
    """A wall-clock value to ``TIME_DIGITS`` significant digits (0.0138, 1.54, 152)."""
    return fmt(float(seconds), TIME_DIGITS) if seconds is not None else "–"


def fmt_spread(fraction: float) -> str:
    """A relative timing spread as "±4 %" (2 significant digits: ±0.83 %, ±12 %); "" when unknown."""
    if fraction is None or not math.isfinite(fraction):
        return ""
    percent = fraction * 100
    return f"±{percent:.2g} %" if percent < 100 else f"±{float(f'{percent:.2g}'):,.0f} %"


def fmt_timed(row, unit: str = "") -> str:
    """A cell's wall-clock (the median of its timed passes) with their spread: "0.153 ±4 %", with ``unit=" s"``
    "0.153 s ±4 %"; just the time for one pass."""
    from .results import relative_spread, row_timing
    median, lo, hi, repeats = row_timing(row)
    spread = fmt_spread(relative_spread(median, lo, hi)) if repeats > 1 else ""
    return f"{fmt_time(median)}{unit} {spread}".strip()


def plural(n, word: str, words: str = "") -> str:
    """``plural(1, "step")`` → "1 step"; ``plural(2, "step")`` → "2 steps"."""
    return f"{fmt(n)} {word if n == 1 else (words or word + 's')}"


def cell_name(row) -> str:
    """A cell as a reader names it: "heun × 2 steps" (", w = 3" for a guided cell)."""
    w = row.get("guidance") if hasattr(row, "get") else None
    guided = w is not None and isinstance(w, (int, float, np.number)) and math.isfinite(float(w))
    return f"{row['solver_label']} × {plural(int(row['steps']), 'step')}" + (f", w = {float(w):g}" if guided else "")


_MARKUP = set("\\`*_[]<>&|$~!#")  # what md_text escapes (``_`` only where it could start or end emphasis)


def md_text(text) -> str:
    """``text`` (a model card's name, description or notes: anything not written by the report itself) as inline
    Markdown that shows exactly that text: each run of white space one space (a line break in it starts no
    heading, list or table), and every character Markdown or HTML would read as markup backslash-escaped
    (CommonMark's escapes; :meth:`Doc.html` shows the escaped character)."""
    t = " ".join(str(text).split())
    out = []
    for i, c in enumerate(t):
        intraword = c == "_" and 0 < i < len(t) - 1 and t[i - 1].isalnum() and t[i + 1].isalnum()
        out.append("\\" + c if c in _MARKUP and not intraword else c)
    return "".join(out)


def _inline_html(text: str) -> str:
    # The Markdown subset used here: `code`, **bold** and backslash escapes (outside code, as in CommonMark).
    out, code, bold, i = [], False, False, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and not code and i + 1 < len(text) and text[i + 1] in string.punctuation:
            out.append(html.escape(text[i + 1]))
            i += 2
            continue
        if c == "`":
            out.append("</code>" if code else "<code>")
            code = not code
        elif not code and text.startswith("**", i):
            out.append("</b>" if bold else "<b>")
            bold = not bold
            i += 1
        else:
            out.append(html.escape(c))
        i += 1
    return "".join(out) + ("</code>" if code else "") + ("</b>" if bold else "")


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
          "line-height:1.45}table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
          "img{max-width:100%}figcaption{font-size:0.85em;color:#555}pre{background:#f6f6f6;"
          "padding:0.6em;overflow-x:auto}code{background:#f6f6f6}")


def _longest_run(text: str, char: str) -> int:
    run = best = 0
    for c in text:
        run = run + 1 if c == char else 0
        best = max(best, run)
    return best


class Doc:
    """Blocks rendered both as Markdown and as HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("ul", items))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def table(self, header: list[str], rows: list[list]):
        self.blocks.append(("table", header, [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]))

    def img(self, rel: str, caption: str):
        self.blocks.append(("img", rel, caption))

    def markdown(self) -> str:
        """The document as Markdown; images link to the files beside it."""
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "code":
                fence = "`" * max(3, _longest_run(b[1], "`") + 1)  # its text cannot close it
                out.append(f"{fence}\n{b[1]}\n{fence}")
            elif b[0] == "table":
                esc = [[md_text(c) for c in r] for r in [b[1]] + b[2]]
                lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
                lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
                out.append("\n".join(lines))
            elif b[0] == "img":
                out.append(f"![{md_text(b[2])}]({b[1]})\n\n*{md_text(b[2])}*")
        return "\n\n".join(out) + "\n"

    def html(self, base: Path, title: str) -> str:
        """The document as one HTML page; images (paths relative to ``base``) embedded as data URIs."""
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{_inline_html(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "code":
                body.append(f"<pre><code>{html.escape(b[1])}</code></pre>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode((base / b[1]).read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2])}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
