"""python -m draft_service --listen HOST:PORT --verifier ADDR[,ADDR...] [--head H] ..."""

import sys

from draft_service.service import main

sys.exit(main())
