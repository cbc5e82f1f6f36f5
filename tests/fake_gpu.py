"""One CUDA device that does not exist: enough of torch, TorchDynamo and Triton believe in it for
TorchInductor to generate the code it would generate for that GPU, on a machine without one.

``install((9, 0))`` answers torch.cuda's questions (available, one device, its properties and compute
capability) from a table of real GPUs, makes fake tensors never touch a device, and installs a Triton
driver that names the target without loading libcuda. Nothing can run or be benchmarked on it: every
path that would launch a kernel, load a cubin or time one raises. For a child process (the install
cannot be undone, and Inductor keeps device properties per process).

It leans on private torch and Triton internals (torch 2.14, triton 3.8): ``FakeTensorMode.avoid_device_init``,
``fake_tensor.init_gpu_context``, TorchDynamo's ``CudaInterface`` and its cached worker properties,
Triton's ``CudaDriver`` and ``DriverConfig``. Where one changes, the code generation fails loudly.
"""

from __future__ import annotations

import sys
import types

import torch

# Per compute capability: SMs, shared memory a block may opt in to, shared memory per SM, L2, name.
GPUS = {
    (8, 0): (108, 163 * 1024, 164 * 1024, 40 << 20, "NVIDIA A100-SXM4-80GB (fake)"),
    (9, 0): (132, 227 * 1024, 228 * 1024, 50 << 20, "NVIDIA H100 80GB HBM3 (fake)"),
    (10, 0): (148, 227 * 1024, 228 * 1024, 126 << 20, "NVIDIA B200 (fake)"),
}


def properties(capability: tuple[int, int]) -> types.SimpleNamespace:
    """What ``torch.cuda.get_device_properties`` reports for such a GPU (the fields Inductor reads)."""
    sms, optin, per_sm, l2, name = GPUS[capability]
    return types.SimpleNamespace(
        name=name, gcnArchName=name, major=capability[0], minor=capability[1], multi_processor_count=sms,
        total_memory=80 << 30, warp_size=32, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
        max_threads_per_block=1024, shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=optin,
        shared_memory_per_multiprocessor=per_sm, L2_cache_size=l2, uuid="00000000-0000-0000-0000-000000000000",
        pci_bus_id=0, pci_device_id=0, pci_domain_id=0, is_integrated=False, is_multi_gpu_board=False,
        clock_rate=1980000, memory_clock_rate=2619000, memory_bus_width=5120)


def _no_device(*args, **kwargs):
    raise RuntimeError("fake GPU: nothing can be loaded, launched or timed on it")


def _driver(capability: tuple[int, int], props: types.SimpleNamespace):
    """A Triton CUDA driver for the target (a subclass, so that Inductor's ``set_driver_to_gpu`` keeps it)
    whose constructor never loads libcuda."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class Utils:
        load_binary = staticmethod(_no_device)

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": props.shared_memory_per_block_optin, "max_num_regs": 65536,
                    "multiprocessor_count": props.multi_processor_count, "warpSize": 32,
                    "sm_clock_rate": props.clock_rate, "mem_clock_rate": props.memory_clock_rate,
                    "mem_bus_width": props.memory_bus_width}

    class FakeCudaDriver(CudaDriver):
        def __init__(self):
            self.utils = Utils()

        def get_current_target(self):
            return GPUTarget("cuda", capability[0] * 10 + capability[1], 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_device_capability(self, device=0):
            return capability

        def get_current_stream(self, device=0):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

        get_benchmarker = get_empty_cache_for_benchmark = _no_device

        @staticmethod
        def is_active():
            return True

    return FakeCudaDriver()


def install(capability: tuple[int, int] = (9, 0)) -> None:
    """Make this process see one GPU of ``capability`` (see the module docstring)."""
    props = properties(capability)
    cuda = torch.cuda
    answers = {
        "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
        "set_device": lambda device: None, "get_device_properties": lambda device=None: props,
        "get_device_capability": lambda device=None: capability, "get_device_name": lambda device=None: props.name,
        "is_bf16_supported": lambda including_emulation=True: True, "_lazy_init": lambda: None,
        "is_initialized": lambda: True, "synchronize": lambda device=None: None,
        "get_arch_list": lambda: ["sm_80", "sm_90", "sm_100"],
        "get_rng_state": lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
        "set_rng_state": lambda state, device="cuda": None, "is_current_stream_capturing": lambda: False,
        "_exchange_device": lambda device: 0, "_maybe_exchange_device": lambda device: 0,
    }
    for name, answer in answers.items():
        setattr(cuda, name, answer)
    torch._C._cuda_getDeviceCount = lambda: 1
    torch._C._cuda_getDevice = lambda: 0

    from torch._subclasses import fake_tensor

    fake_tensor.FakeTensorMode.avoid_device_init = property(lambda self: True)  # no constants moved to the device
    fake_tensor.init_gpu_context = lambda device: None

    from torch._dynamo import device_interface

    interface = device_interface.CudaInterface  # bound torch.cuda's functions when it was imported
    for name in ("current_device", "set_device", "device_count", "get_device_properties", "synchronize",
                 "is_bf16_supported", "is_available"):
        setattr(interface, name, staticmethod(answers[name]))
    interface.exchange_device = staticmethod(answers["_exchange_device"])
    interface.maybe_exchange_device = staticmethod(answers["_maybe_exchange_device"])
    interface.Worker.current_device = staticmethod(lambda: 0)
    interface.Worker.get_device_properties = staticmethod(answers["get_device_properties"])
    device_interface.caching_worker_device_properties["cuda"] = [props]

    import triton.runtime.driver  # noqa: F401  (the module, which the package's attribute shadows)

    config = sys.modules["triton.runtime.driver"].driver
    fake = _driver(capability, props)
    config._default = fake
    config.set_active(fake)
