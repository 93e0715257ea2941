"""`python -m llm4gen_lite ...`: see `llm4gen_lite.cli`."""
import sys

from .cli import main

sys.exit(main())
