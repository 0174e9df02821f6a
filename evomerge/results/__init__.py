"""Results of a search: ``store`` reads the study (trial -> recipe, top trials, provenance),
``report`` makes tables, ``plots`` draws, ``files`` writes them all to a directory."""

from evomerge.results.files import export_study, write_results
from evomerge.results.report import report_table

__all__ = ["export_study", "report_table", "write_results"]
