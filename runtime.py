"""
Where and in what precision the scripts run: one rule for train.py, sample.py, eval.py and the benchmarks.
"""
import os
import sys
from contextlib import nullcontext

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# dense peak FLOP/s of common GPUs (no sparsity), for MFU: (bfloat16/float16 tensor cores, float32 as train.py runs
# it: TF32 tensor cores where the GPU has them, Ampere and newer, else plain float32); the first name found in the
# device's name wins
PEAK_FLOPS = {'H200': (989e12, 495e12), 'H100 PCIe': (756e12, 378e12), 'H100 NVL': (835e12, 418e12),
              'H100': (989e12, 495e12), 'A100': (312e12, 156e12), 'L40S': (362e12, 183e12), 'A10': (125e12, 62.5e12),
              '4090': (165e12, 82.6e12), '3090': (71e12, 35.6e12), 'V100': (125e12, 15.7e12), 'T4': (65e12, 8.1e12)}


def resolve_device(name):
    """'auto' is the best device here: cuda, then mps, then cpu. A named device must exist: ValueError if not."""
    if name.startswith('cuda'):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = name.partition(':')[2]
        if not count:
            raise ValueError(f"device={name!r}, but PyTorch sees no CUDA GPU here (no GPU, no driver, or PyTorch's CPU "
                             f"build): use --device=cpu, or --device=auto to take the best there is")
        if index and (not index.isdigit() or int(index) >= count):
            raise ValueError(f'device={name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}')
    elif name == 'mps' and not torch.backends.mps.is_available():
        raise ValueError("device='mps', but this PyTorch sees no Apple GPU: use --device=cpu or --device=auto")
    elif name not in ('auto', 'cpu', 'mps') and not name.startswith('cuda'):
        raise ValueError(f"device={name!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if name != 'auto':
        return name
    if torch.cuda.is_available():
        return 'cuda'
    if torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def resolve_dtype(name, device):
    """'auto' is bfloat16 where the device computes it natively, float16 (with a GradScaler) on older NVIDIA
    GPUs, and float32 on CPUs (they gain little from autocast and lose accuracy)."""
    if name not in ('auto', *DTYPES):
        raise ValueError(f"dtype={name!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    if name != 'auto':
        return name
    if device.startswith('cuda'):
        return 'bfloat16' if native_bfloat16(device) else 'float16'
    if device.startswith('mps'):
        # Apple GPUs compute bfloat16 from macOS 14 on; float16 would need a GradScaler, which MPS gained only
        # recently and with bugs, so older systems stay in float32
        return 'bfloat16' if torch.backends.mps.is_macos_or_newer(14, 0) else 'float32'
    return 'float32'


def native_bfloat16(device):
    """Whether a CUDA GPU computes bfloat16 in hardware. Not torch.cuda.is_bf16_supported(): it also says yes on a T4
    or V100, which only emulate bfloat16 (several times slower than their float16); native bfloat16 starts with
    Ampere, compute capability 8.0."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def autocast(device, dtype):
    """Mixed precision: float32 weights, matmuls in dtype. A no-op for float32."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=DTYPES[dtype])


def batch_to_device(rows, device):
    """Inputs and next-token targets of rows, a (B, T + 1) int64 array of token windows (or an (inputs, targets)
    pair of (B, T) arrays: a chat dataset's, see dataset.sample_windows), on device. On CUDA they go through pinned
    memory and copy asynchronously, overlapping the GPU's work; that needs contiguous tensors, which the slices
    [:, :-1] and [:, 1:] are not until copied."""
    if isinstance(rows, tuple):
        x, y = (torch.from_numpy(part) for part in rows)
    else:
        rows = torch.from_numpy(rows)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def mfu(flops_per_token, tokens_per_iter, dt, peak_flops, world_size=1):
    """Model FLOPs utilisation of each device: the FLOP/s it achieved as a fraction of its peak. Under DDP the
    iteration's tokens are spread over world_size devices. None where the peak is unknown (CPUs)."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_iter / world_size / dt / peak_flops


def peak_flops(device, dtype):
    """The device's dense peak for dtype's matmuls (bfloat16/float16 tensor cores; TF32 or plain float32 for
    float32), for MFU; None where it is not known (CPUs)."""
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    half, single = next((flops for key, flops in PEAK_FLOPS.items() if key in name), (None, None))
    return half if dtype in ('bfloat16', 'float16') else single


def free_memory(device):
    """Memory this process may still take, in bytes: on CUDA the GPU's free memory, on MPS what Metal recommends less
    what it holds, on a CPU the machine's available memory shared among this node's processes (torchrun's
    LOCAL_WORLD_SIZE); None where it cannot be known (a CPU without Linux's /proc)."""
    if device.startswith('cuda'):
        return torch.cuda.mem_get_info(device)[0]
    if device.startswith('mps'):
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open('/proc/meminfo') as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return None
    return available // int(os.environ.get('LOCAL_WORLD_SIZE', 1))


def peak_memory_mib(device):
    """This process's peak memory in MiB: on CUDA what PyTorch's allocator held at most, elsewhere the peak resident
    memory of the whole process (Python and PyTorch included, ~0.3 GiB); None where unknown."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # Linux: VmHWM is this process's own peak (ru_maxrss can include what a vfork parent had)
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmHWM:'))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == 'darwin' else 1024)


class MemoryPhases:
    """This process's peak memory in each phase of a run (its start, training, saves, ...), in MiB, as
    peak_memory_mib measures it: the high-water mark is reset as each phase begins (on CUDA PyTorch's; on Linux the
    kernel's, through /proc/self/clear_refs; elsewhere a phase's figure is the peak so far)."""

    def __init__(self, device, phase):
        self.device, self.phase, self.peaks = device, phase, {}

    @staticmethod
    def summary(phases, device):
        """The lines train.py ends with: every process's peak (phases: each process's peaks, rank 0 first), and by
        phase."""
        what = 'allocated by PyTorch' if device.startswith('cuda') else 'resident, the whole process'
        peaks = ', '.join(f'{max(p.values()):,.0f}' for p in phases)
        by_phase = '; '.join(f"{name} {', '.join(f'{p[name]:,.0f}' for p in phases)}" for name in phases[0])
        overall = (f'peak memory per process: {peaks} MiB ({what})' if len(phases) > 1 else f'peak memory {peaks} MiB')
        return f'{overall}\npeak memory by phase, MiB per process: {by_phase}'

    def enter(self, phase):
        """End the current phase (its peak joins any earlier peak of the same name) and begin phase (None: the
        end of the run)."""
        peak = peak_memory_mib(self.device)
        if peak is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), peak)
        self.phase = phase
        if self.device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')  # resets VmHWM to the current resident memory
            except OSError:
                pass
