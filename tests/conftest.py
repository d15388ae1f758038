import pytest
import torch


def pytest_collection_modifyitems(config, items):
    num_gpus = torch.cuda.device_count()
    for item in items:
        if "gpu" in item.keywords and num_gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "multi_gpu" in item.keywords and num_gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs several CUDA devices"))
