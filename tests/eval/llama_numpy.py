"""Re-export of clients/python/examples/llama_numpy.py (the numpy Llama forward moved there so
that the Python client's frontend example can use it; the eval harness keeps importing
`llama_numpy` from this folder). `import llama_numpy` here gives that module itself."""

import importlib.util
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients",
                     "python", "examples", "llama_numpy.py")
_spec = importlib.util.spec_from_file_location("llama_numpy", os.path.abspath(_PATH))
_mod = importlib.util.module_from_spec(_spec)
sys.modules["llama_numpy"] = _mod  # `import llama_numpy` returns this module
_spec.loader.exec_module(_mod)
