import os

# The suite tests the compiled ops: a missing extension is an error here, not a silent fallback.
os.environ.setdefault("PYMERGE_REQUIRE_EXTENSION", "1")
