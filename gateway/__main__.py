"""python -m gateway --listen HOST:PORT --draft ADDR[,ADDR...] [--redis URL] ..."""

import sys

from gateway.service import main

sys.exit(main())
