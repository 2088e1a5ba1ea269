"""Reports: heatmaps of layer scores (PNG)."""

from ila.report.heatmap import plot_heatmap

__all__ = ["plot_heatmap"]
