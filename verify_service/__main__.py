"""python -m verify_service --listen HOST:PORT [--model M] ... (flags or AERIE_* variables)."""

import sys

from verify_service.service import main

sys.exit(main())
