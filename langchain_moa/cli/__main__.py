"""`python -m langchain_moa.cli`."""

import sys

from langchain_moa.cli import main

sys.exit(main())
