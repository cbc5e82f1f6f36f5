"""Stage 4: what a run writes: the report, tables and JSON, and atomic file output."""
