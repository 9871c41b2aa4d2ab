"""Every entry point, over one service layer (``service``): the command line (``cli/``), the HTTP
API (``http/``) and the web page (``static/``). They translate; the logic lives below them.
"""

import catalens.indexer  # noqa: E402, F401 - its BLAS thread setting must come before numpy loads
