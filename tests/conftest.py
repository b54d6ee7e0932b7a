"""pytest set-up: the project root on sys.path, and where the shared reference files live."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ../shared beside the checkout holds the official reference model and real data; tests that need it skip
# (saying so) where it is absent. DEEPAVFUSION_SHARED points elsewhere.
SHARED = Path(os.environ.get('DEEPAVFUSION_SHARED', ROOT.parent / 'shared'))
