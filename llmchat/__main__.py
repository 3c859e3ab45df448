"""`python -m llmchat` = the `llmchat` command."""

import sys

from llmchat.cli import main

sys.exit(main())
