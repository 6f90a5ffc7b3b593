"""What perf/compare and perf/compare-vsock share: the repository's root,
logging, installing from Debian, building, medians and their spread, number
formatting and the grouped-bar SVG chart.

Both scripts are run as programs (`python3 perf/compare ...`, from any
directory) and import this file from their own directory. Standard library
only.
"""

import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bar colours of the charts, one per workload.
COLORS = ["#4c78a8", "#72b7b2", "#f58518", "#e45756"]


def logger(name):
    """A log function that writes `[name] parts...` to stderr at once."""

    def log(*parts):
        print(f"[{name}]", *parts, file=sys.stderr, flush=True)

    return log


def apt_install(packages, quiet="-q", sudo=False, timeout=None):
    """Install Debian packages; when that fails, update the lists once and try again."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    prefix = ["sudo"] if sudo and os.geteuid() != 0 else []
    if subprocess.run(prefix + ["apt-get", "install", "-y", quiet] + packages, env=env, timeout=timeout).returncode:
        subprocess.run(prefix + ["apt-get", "update", quiet], env=env, timeout=timeout, check=True)
        subprocess.run(prefix + ["apt-get", "install", "-y", quiet] + packages, env=env, timeout=timeout, check=True)


def cargo_build(args, env=None, timeout=None):
    """`cargo build ARGS` in the repository's root."""
    subprocess.run(["cargo", "build"] + args, cwd=ROOT, env=env, timeout=timeout, check=True)


def median(values):
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def spread(values, digits=2):
    """`min-max` of ratios (or of figures, with fewer digits), `-` for none."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if values else "-"


def fmt(v, digits=2, suffix=""):
    """A figure for a table cell: `-` when there is none."""
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def bar_chart(title, legend, groups, *, left, width, scale_max, ticks, legend_step, right, missing,
              highlight=None):
    """Grouped horizontal bars of ratios (SVG, no dependencies): one group per
    (label, [ratio or None per legend entry]); a bar longer than scale_max is
    cut there, a missing ratio is written as `missing`; the tick at
    `highlight` is drawn darker. Returns the SVG's lines."""
    bar_h, top, gap = 12, 40, 14
    group_h = len(legend) * bar_h + gap
    height = top + len(groups) * group_h + 40
    plot_w = width - left - right
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13">{title}</text>']
    for i, label in enumerate(legend):
        out.append(f'<rect x="{left + i * legend_step}" y="26" width="10" height="10" fill="{COLORS[i]}"/>'
                   f'<text x="{left + i * legend_step + 14}" y="35">{label}</text>')
    for tick in ticks:
        x = left + plot_w * tick / scale_max
        stroke = "#555" if tick == highlight else "#ddd"
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - 30}" stroke="{stroke}"/>'
                   f'<text x="{x:.1f}" y="{height - 16}" text-anchor="middle">{tick:g}x</text>')
    for g, (label, ratios) in enumerate(groups):
        y0 = top + g * group_h + 4
        out.append(f'<text x="{left - 6}" y="{y0 + len(legend) * bar_h / 2 + 4}" text-anchor="end">'
                   f'{label.replace("&", "&amp;").replace("<", "&lt;")}</text>')
        for i, r in enumerate(ratios):
            y = y0 + i * bar_h
            if r is None:
                out.append(f'<text x="{left + 4}" y="{y + bar_h - 2}" fill="#a00">{missing}</text>')
                continue
            w = plot_w * min(r, scale_max) / scale_max
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{COLORS[i]}"/>'
                       f'<text x="{left + w + 3:.1f}" y="{y + bar_h - 3}">{r:.2f}</text>')
    out.append("</svg>")
    return out
