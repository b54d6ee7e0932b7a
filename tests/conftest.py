"""pytest set-up: the project root on sys.path, and the folder of the tests' fixtures."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = Path(__file__).resolve().parent / 'fixtures'


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test: small operators gain nothing from two, and on a machine whose cores
    are busy with other work a second OpenMP thread waits at every operator's barrier (60x slower measured)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
