"""ocr_assets: document page images to structured text, as partitioned Dagster assets."""

__version__ = "0.1.0"
