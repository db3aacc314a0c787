"""runtime.py: which precision 'auto' picks on each kind of device (the device queries mocked, since no
GPU is here), and model FLOPs utilisation per device."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import runtime
from model import GPT, GPTConfig


@pytest.mark.parametrize('capability,expected', [((7, 5), 'float16'), ((7, 0), 'float16'), ((6, 1), 'float16'),
                                                 ((8, 0), 'bfloat16'), ((8, 9), 'bfloat16'), ((9, 0), 'bfloat16')],
                         ids=['T4', 'V100', 'P40', 'A100', 'L40S', 'H100'])
def test_auto_dtype_on_cuda_is_native_bfloat16_or_float16(monkeypatch, capability, expected):
    """bfloat16 only where the GPU computes it natively (compute capability 8.0, Ampere, and newer): a T4 or V100
    emulates it, slowly, while torch.cuda.is_bf16_supported() still says yes. Elsewhere float16 + GradScaler."""
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, 'hip', None)
    assert runtime.resolve_dtype('auto', 'cuda') == expected
    assert runtime.resolve_dtype('auto', 'cuda:1') == expected
    assert runtime.resolve_dtype('float32', 'cuda') == 'float32'  # a named dtype is kept


@pytest.mark.parametrize('sonoma,expected', [(True, 'bfloat16'), (False, 'float32')])
def test_auto_dtype_on_mps(monkeypatch, sonoma, expected):
    """Apple GPUs compute bfloat16 from macOS 14; before it, float32 (float16 would need a GradScaler, which
    MPS has only lately and not reliably)."""
    monkeypatch.setattr(torch.backends.mps, 'is_macos_or_newer', lambda major, minor: sonoma and (major, minor) <= (14, 0))
    assert runtime.resolve_dtype('auto', 'mps') == expected


def test_auto_dtype_on_cpu_is_float32_and_bad_names_are_refused():
    assert runtime.resolve_dtype('auto', 'cpu') == 'float32'
    with pytest.raises(ValueError, match="use 'auto', 'float32', 'bfloat16' or 'float16'"):
        runtime.resolve_dtype('fp8', 'cpu')


def test_flops_per_token_match_pytorchs_flop_counter():
    """The PaLM estimate (6 N + 12 L T d per token) against PyTorch's own count of one forward and backward pass,
    with attention run as plain matrix products so that they are counted too. The estimate counts the norm gains
    as if they were matmul weights (6 FLOPs each); that is all that separates the two."""
    for untied in (False, True):
        config = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=96, bias=False, tie_weights=not untied)
        model = GPT(config)
        B, T = 2, config.block_size
        idx = torch.randint(0, config.vocab_size, (B, T))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(idx, idx)[1].backward()
        counted = counter.get_total_flops() / (B * T)
        norm_gains = (2 * config.n_layer + 1) * config.n_embd
        assert model.flops_per_token() == counted + 6 * norm_gains, untied


def test_mfu_is_per_device():
    """Under DDP the iteration's tokens are shared by all the processes: each GPU did 1/world_size of the work.
    By hand: 1e9 FLOPs per token x 8192 tokens in 0.5 s is 16.4 TFLOP/s in all, 4.1 on each of 4 GPUs, which
    have a 100 TFLOP/s peak: 4.1%."""
    assert runtime.mfu(1e9, 8192, 0.5, 100e12, world_size=4) == pytest.approx(0.04096)
    assert runtime.mfu(1e9, 8192, 0.5, 100e12) == pytest.approx(0.16384)
    assert runtime.mfu(1e9, 8192, 0.5, None) is None  # no known peak (a CPU)


def test_batches_are_contiguous_before_pinning(monkeypatch):
    """A host-to-GPU copy from pinned memory is asynchronous only from a contiguous tensor; the input and target
    slices of the token windows are not contiguous until copied. The GPU is faked: pinning and copying to 'cuda'
    record what they were given."""
    pinned, copied = [], []

    def pin_memory(tensor):
        pinned.append(tensor.is_contiguous())
        return tensor

    def to(tensor, device, non_blocking=False):
        copied.append((device, non_blocking))
        return tensor

    monkeypatch.setattr(torch.Tensor, 'pin_memory', pin_memory)
    monkeypatch.setattr(torch.Tensor, 'to', to)
    rows = torch.arange(2 * 9).view(2, 9).numpy()
    x, y = runtime.batch_to_device(rows, 'cuda:0')
    assert pinned == [True, True] and copied == [('cuda:0', True), ('cuda:0', True)]
    assert x.tolist() == [list(range(0, 8)), list(range(9, 17))] and y.tolist() == [list(range(1, 9)), list(range(10, 18))]


@pytest.mark.parametrize('name,dtype,expected', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12), ('NVIDIA H100 80GB HBM3', 'float32', 495e12),
    ('NVIDIA A100-SXM4-40GB', 'float16', 312e12), ('NVIDIA A100-SXM4-40GB', 'float32', 156e12),
    ('Tesla V100-SXM2-16GB', 'float16', 125e12), ('Tesla V100-SXM2-16GB', 'float32', 15.7e12),
    ('Tesla T4', 'float32', 8.1e12), ('Some Future GPU', 'bfloat16', None)])
def test_mfu_peak_is_that_of_the_dtype_the_matmuls_run_in(monkeypatch, name, dtype, expected):
    """A float32 run's matmuls run on TF32 tensor cores (train.py allows them; half the 16-bit rate on an A100 or
    H100), or on plain float32 units where there are none (V100, T4): against the bfloat16 peak its MFU would read
    2x to 16x too low. The GPU's name is mocked; the figures are NVIDIA's dense (no sparsity) datasheet peaks."""
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    assert runtime.peak_flops('cuda:0', dtype) == expected
    assert runtime.peak_flops('cpu', dtype) is None


@pytest.mark.parametrize('capability,expected', [((7, 0), torch.float32), ((7, 5), torch.float32),
                                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
                         ids=['V100', 'T4', 'A100', 'H100'])
def test_muon_orthogonalises_in_bfloat16_only_where_the_gpu_has_it(monkeypatch, capability, expected):
    """Newton-Schulz in bfloat16 is fast on tensor cores that compute it, and emulated, several times slower, on a
    V100 or T4: the rule that picks train.py's dtype decides (the GPU's capability mocked)."""
    from muon import newton_schulz_dtype
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.version, 'hip', None)
    assert newton_schulz_dtype('cuda:0') == expected
    assert newton_schulz_dtype('cpu') == torch.float32


def test_memory_phases_reset_the_peak_at_each_phase():
    """Each phase's peak is its own (Linux resets the process's high-water mark as a phase begins): a large tensor
    alive only in the first phase does not show in the second. Elsewhere a phase's figure is the peak so far."""
    import sys
    phases = runtime.MemoryPhases('cpu', 'big')
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB
    big += 1
    del big
    phases.enter('small')
    phases.enter(None)
    if sys.platform.startswith('linux'):
        assert phases.peaks['big'] - phases.peaks['small'] > 48, phases.peaks
    else:
        assert phases.peaks['small'] >= phases.peaks['big'], phases.peaks
