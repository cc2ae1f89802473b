"""Shared fixtures: real checkpoints on disk, written once per machine into the workbench cache."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir():
    from workbench import fixtures

    return fixtures.smollm2_path()


@pytest.fixture(scope="session")
def smollm2_session(smollm2_dir):
    import workbench as wb

    return wb.load(str(smollm2_dir), preset="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """tiny_checkpoint(family, mxfp4=False) -> folder of a tiny real-layout checkpoint."""
    from workbench import fixtures

    return fixtures.tiny_checkpoint
