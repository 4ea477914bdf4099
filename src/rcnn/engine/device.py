"""Device and precision: where models run and in which dtype, the same rule for every family."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from rcnn.utils.errors import RcnnError

T = TypeVar("T")


def select_device(preference: str = "auto") -> torch.device:
    """The torch device for ``preference`` ("auto": cuda, then mps, then cpu); error if unavailable."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if preference == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if preference == "cuda" and not cuda:
        raise RcnnError("train.device = 'cuda' but no CUDA GPU is available: use 'auto' or 'cpu'")
    if preference == "mps" and not mps:
        raise RcnnError("train.device = 'mps' but Apple MPS is not available: use 'auto' or 'cpu'")
    if preference not in ("cpu", "cuda", "mps"):
        raise RcnnError(f"unknown device {preference!r}: expected one of auto, cpu, cuda, mps")
    return torch.device(preference)


def use_channels_last(device: torch.device) -> bool:
    """Whether NHWC (channels-last) input is faster for the backbone on ``device``.

    Measured on a 2-core AVX-512 CPU: 1.1-2x faster than NCHW for mobilenet_v2, resnet18 and
    resnet50 at 128-224 px; on CUDA it is what cuDNN's tensor-core kernels want.
    """
    return device.type in ("cpu", "cuda")


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX present (torch's own CPU feature probes; absent in old torch -> False)."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def inference_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), float16 on
    CUDA GPUs without bf16 (their tensor cores; training scales its gradients, :func:`training_scaler`), else
    float32.

    Measured on a CPU with AVX512-BF16: 2-4x the fp32 throughput of the backbone; CPUs without native bf16
    would be slower, so they stay fp32. The features are not the same: MobileNetV2's last map differs from
    float32's by 15-30% (relative L2; cosine 0.95-0.99), most of it from rounding the input of block 2, whose
    BatchNorm cancels it. Trained either way the models score alike (neu-few, docs/few-photos.md), but a model
    scored in another precision than it was validated in moves by a few points, so every checkpoint records its
    :func:`precision_name`.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def precision_name(device: torch.device) -> str:
    """The dtype detection computes in on ``device`` (``bfloat16``, ``float16`` or ``float32``), as checkpoints
    record it."""
    return str(inference_dtype(device)).removeprefix("torch.")


def training_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled where training autocasts to float16 (whose small gradients would underflow to
    zero); disabled it passes every call through, so bfloat16 and float32 training are unchanged."""
    return torch.amp.GradScaler(device.type, enabled=inference_dtype(device) == torch.float16)


def tune_for_bounded_shapes(device: torch.device) -> None:
    """``cudnn.benchmark`` on CUDA, for a run whose batch shapes are bounded (grouped batches): each shape's
    convolution algorithms are timed once and reused. On a GPU results were never bitwise reproducible
    across runs (RoIAlign's backward adds atomically); on a CPU this does nothing."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to :func:`inference_dtype` for backbone inference; use it for every inference pass
    (features stage and detection) so cached and live features have the same numerics."""
    dtype = inference_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def in_float32_if_not_finite(compute: Callable[[], T], finite_parts: Callable[[T], Sequence[torch.Tensor]],
                              device: torch.device) -> T:
    """``compute()`` under the caller's autocast, or again in float32 where any of ``finite_parts`` of its result
    is not finite: reduced-precision CPU kernels now and then return NaN on degenerate maps (an image 25 times
    longer than wide, docs/stages.md), and that image is scored at full precision rather than lost."""
    out = compute()
    if all(bool(torch.isfinite(part).all()) for part in finite_parts(out)):
        return out
    with torch.autocast(device.type, enabled=False):
        return compute()


def _accelerator() -> tuple[str | None, list[int]]:
    """The accelerator torch would use (cuda, mps, ...) and its device indices; (None, []) on a CPU-only machine."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None:  # a CUDA build of torch names cuda even where no GPU is present
        return None, []
    return accelerator.type, list(range(torch.get_device_module(accelerator.type).device_count()))


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """torch's generators seeded with ``seed`` inside; after it, every one of them as it was, the accelerator's
    included: ``torch.manual_seed`` reseeds CUDA's generators too, and restoring only the CPU's would restart a
    GPU run's RoI and anchor sampling from the same state after every call."""
    device_type, devices = _accelerator()
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        yield


def accelerator_rng_state() -> dict[str, Any] | None:
    """The accelerator's generator states, for a resume point (None on a CPU-only machine)."""
    device_type, devices = _accelerator()
    if device_type is None:
        return None
    module = torch.get_device_module(device_type)
    return {"type": device_type, "states": [module.get_rng_state(index) for index in devices]}


def restore_accelerator_rng_state(saved: dict[str, Any] | None) -> bool:
    """Put back :func:`accelerator_rng_state`'s states where this machine has the same accelerator and device
    count; False (nothing changed) where it does not, as when a GPU run resumes on a CPU."""
    device_type, devices = _accelerator()
    if not isinstance(saved, dict) or saved.get("type") != device_type or len(saved.get("states", [])) != len(devices):
        return False
    module = torch.get_device_module(device_type)
    for index, state in zip(devices, saved["states"]):
        module.set_rng_state(state, index)
    return True
