"""`python -m cmvae ...` is `cmvae ...`."""

import sys

from .cli import main

sys.exit(main())
