import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (author_fixture) import by name
