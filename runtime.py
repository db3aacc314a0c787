"""
Where and in what precision the scripts run: one rule for train.py, sample.py, eval.py and the benchmarks.
"""
from contextlib import nullcontext

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# dense bf16 peak FLOP/s of common GPUs (no sparsity), for MFU; the first name found in the device's name wins
PEAK_FLOPS = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'A100': 312e12,
              'L40S': 362e12, 'A10': 125e12, '4090': 165e12, '3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def resolve_device(name):
    """'auto' is the best device here: cuda, then mps, then cpu."""
    if name != 'auto':
        return name
    if torch.cuda.is_available():
        return 'cuda'
    if torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def resolve_dtype(name, device):
    """'auto' is bfloat16 on GPUs that have it, else float16 on CUDA, float32 elsewhere (CPUs gain little
    from autocast and lose accuracy)."""
    if name not in ('auto', *DTYPES):
        raise ValueError(f"dtype={name!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    if name != 'auto':
        return name
    if device.startswith('cuda'):
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


def autocast(device, dtype):
    """Mixed precision: float32 weights, matmuls in dtype. A no-op for float32."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=DTYPES[dtype])


def peak_flops(device):
    """The device's dense bf16 peak, for MFU; None where it is not known (CPUs)."""
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
