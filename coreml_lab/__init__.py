"""coreml_lab: diagnose PyTorch/ONNX models converted to Apple Core ML.

Public names (see README): ConversionOptions, convert, Conversion, diagnose, Report.
"""

from .messages import import_messages as _import_messages

_import_messages()  # capture what coremltools logs at import time, before anything else imports it

from .bundle import compare_reports  # noqa: E402
from .compression_fix import CompressionFix, find_uncompressed_ops  # noqa: E402
from .conversion import Conversion, ConversionError  # noqa: E402
from .convert import convert  # noqa: E402
from .diagnosis import diagnose  # noqa: E402
from .fixes import MixedPrecisionFix, find_fp32_ops  # noqa: E402
from .lint import lint  # noqa: E402
from .options import ConversionOptions  # noqa: E402
from .report import Report, load_report  # noqa: E402
from .suggestions import suggest_fixes  # noqa: E402
from .targets import target_matrix  # noqa: E402

__all__ = ["ConversionOptions", "convert", "Conversion", "ConversionError", "diagnose", "Report", "load_report",
           "compare_reports", "find_fp32_ops", "MixedPrecisionFix", "suggest_fixes", "target_matrix", "lint",
           "find_uncompressed_ops", "CompressionFix"]
__version__ = "0.1.0"
