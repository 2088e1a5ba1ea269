"""Reports: heatmaps of layer scores and of ranking agreement (PNG); one HTML page per study (`html.py`)."""

from ila.report.agreement import plot_agreement
from ila.report.heatmap import plot_heatmap

__all__ = ["plot_agreement", "plot_heatmap"]
