"""The libraries every stage needs, imported once by `mlmesh up`'s fork server.

Stages forked from that server inherit them already imported (launcher.py),
instead of paying about 2.5 s of imports each. Nothing here may import gRPC,
directly or through services.runtime: the fork server must never have loaded
it, so that no process which has started gRPC is ever forked.
"""

from __future__ import annotations

import sys

# skops imports scikit-learn's testing helpers, which import pytest whenever it is
# installed (a development venv): 0.3 s and a test framework inside a service. None
# in sys.modules makes that import fail, and scikit-learn goes on without it.
sys.modules.setdefault("pytest", None)  # type: ignore[arg-type]

import fsspec  # noqa: E402,F401
import numpy  # noqa: E402,F401
import pandas  # noqa: E402,F401
import pyarrow  # noqa: E402
import pyarrow.parquet  # noqa: E402,F401
import sklearn.compose  # noqa: E402
import sklearn.ensemble  # noqa: E402
import sklearn.feature_selection  # noqa: E402
import sklearn.impute  # noqa: E402
import sklearn.linear_model  # noqa: E402
import sklearn.metrics  # noqa: E402
import sklearn.model_selection  # noqa: E402
import sklearn.pipeline  # noqa: E402
import sklearn.preprocessing  # noqa: E402,F401
import skops.io  # noqa: E402,F401
