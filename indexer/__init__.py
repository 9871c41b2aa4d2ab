"""Building an index: backbones and features by registry (``backbones/``, ``features/``), the
stores behind one contract (``stores/``: folder and Elasticsearch backends), what is fitted on a
catalog (``training/``), and the one pipeline that ties them together (``pipeline``).
``stores.backends.open_catalog`` opens one.
"""

import os

# OpenBLAS (numpy's and faiss's) keeps its threads spinning for 2^28 cycles, about 0.1 s, after
# every product, waiting for the next. A search makes a few products in 50 ms, so they never
# slept: 86-100 ms of CPU a search for 45-51 ms of wall time, which starved searches running
# side by side. 2^4 cycles puts them to sleep at once: 58-74 ms of CPU for the same wall time.
# Read when OpenBLAS loads, so it is set here, before anything in catalens imports numpy; a
# process that loaded numpy first keeps its own setting.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

