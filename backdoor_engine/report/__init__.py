"""Scan reports: report.json (the stable schema), samples.csv (one row per sample), report.html (for people)."""

from .figures import embedding_png, montage_png
from .schema import build_report, versions
from .writers import write_report

__all__ = ["build_report", "embedding_png", "montage_png", "versions", "write_report"]
