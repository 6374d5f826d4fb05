"""open_clip -> ONNX export with self-verification. Needs the ``export`` extra (torch, open_clip).

Nothing here is imported by the runtime; torch is imported inside the functions only.
"""

from clipworks.export.exporter import ExportReport, export_model

__all__ = ["ExportReport", "export_model"]
