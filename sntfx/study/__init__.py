"""``sntfx study``: train, fold, compress and deploy every model x method x seed, and report.

The package is layered without cycles: :mod:`.config` (methods, settings,
presets) <- :mod:`.stats` (metrics, gains, schema) <- :mod:`.report`
(report.md and plots) <- :mod:`.runner` (the resumable stages).
"""

from .config import (PRESETS, Method, StudyConfig, parse_methods, parse_seeds, preset_config, quick_data,
                     read_config_file, slug)
from .report import short_verdict, write_report
from .runner import Run, Study, StudyProgress, environment
from .stats import (PRIMARY_SCORES, SCHEMA_PATH, SCHEMA_VERSION, confidence_interval, metrics_of, summarize,
                    validate_results)

__all__ = [
    "Method", "StudyConfig", "Study", "Run", "StudyProgress", "PRESETS", "preset_config", "quick_data", "read_config_file",
    "parse_methods", "parse_seeds", "slug", "SCHEMA_PATH", "SCHEMA_VERSION", "metrics_of", "summarize",
    "validate_results", "write_report", "short_verdict", "environment", "PRIMARY_SCORES", "confidence_interval",
]
