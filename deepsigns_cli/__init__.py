"""deepsigns: watermark neural networks and prove ownership later."""

import os as _os

__version__ = "0.1.0"

# onnxruntime (1.31 at least) keeps a device id and a queue of telemetry events for upload in
# ~/.cache/Microsoft, and warns on stderr where HOME cannot be written: nothing of ours reaches
# the network, or leaves files behind, at run time. Set before onnxruntime is first imported.
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"
__all__ = ["__version__"]
