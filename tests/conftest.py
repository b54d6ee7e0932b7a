"""pytest set-up: the project root on sys.path, and the folder of the tests' fixtures."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
