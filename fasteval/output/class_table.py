"""The class report's rows in the text table: intervals, macro figures, calibration, the five worst
classes and the five most confused pairs, kept compact (one row each, continuation rows for lists)."""

from __future__ import annotations

import math


def _pct(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def class_rows(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows for ``format_table``; none when the report has no class report."""
    if "per_class" not in report:
        return []
    rows = []
    intervals = report["intervals"]
    for key in ("top1", "top5"):
        low, high = intervals[key]
        rows.append((f"{key[:3]}-{key[3]} 95 % CI", f"[{low:.2f}, {high:.2f}] %  (Wilson)"))
    macro = report["macro"]
    rows.append(("macro P / R / F1", f"{_pct(macro['precision'])} / {_pct(macro['recall'])} / {_pct(macro['f1'])} %"
                 f"   balanced accuracy {_pct(report['balanced_accuracy'])} %"))
    cal = report["calibration"]
    ece, brier = cal["ece"], cal["brier"]
    rows.append(("calibration", f"ECE ({cal['bins']} bins) {'nan' if ece is None or math.isnan(ece) else f'{ece:.4f}'}"
                 + ("" if brier is None else f"   Brier {brier:.4f}")))
    per_class = report["per_class"]
    worst = [f"{per_class[i]['class']}  {_pct(per_class[i]['recall'])} % "
             f"({per_class[i]['correct_top1']}/{per_class[i]['samples']}, CI "
             f"{_pct(per_class[i]['recall_interval'][0])}-{_pct(per_class[i]['recall_interval'][1])})"
             for i in report["worst_classes"]]
    pairs = [f"{p['true']} -> {p['predicted']}  {p['count']}" for p in report["confused_pairs"]]
    for label, items in (("worst classes (recall)", worst), ("most confused (true -> pred)", pairs or ["none"])):
        rows += [(label if j == 0 else "", item) for j, item in enumerate(items)]
    return rows
