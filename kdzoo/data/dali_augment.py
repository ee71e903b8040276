"""``data.loader=dali``: NVIDIA DALI decodes and augments the class-folder batches (docs/config.md, ImageNet loading).

DefangChen/SimKD's ImageNet script builds the whole input pipeline in DALI: a file reader sharded by rank,
``decoders.image_random_crop`` on "mixed", resize, a coin-flip mirror and ``crop_mirror_normalize``; validation
resizes the shorter side to 256 and takes the central 224 crop. kdzoo keeps DALI for the part that costs: decoding
(nvJPEG on "mixed" with a GPU; libjpeg-turbo on the CPU without one), the crop, the antialiased resize, the mirror
and the normalisation. What DALI's reader and random crop would decide is kdzoo's own instead:

- the sample order is kdzoo's rank share (:func:`kdzoo.data.planned_loader.rank_share`), so DDP ranks split an
  epoch the same way on every backend, a resumed run continues at the exact next batch (DALI's reader resumes at
  an epoch boundary only), and ``Batch.index`` carries each sample's dataset index (CRD's memory bank);
- each crop is the explicit (top, left, height, width, flip) the worker drew with torchvision's rule
  (:mod:`kdzoo.data.resized_crop`), handed to ``decoders.image_slice``. DALI's own random crop samples its area in
  [0.1, 1] and aspect in [0.8, 1.25] by default where torchvision's defaults are [0.08, 1] and [3/4, 4/3]; here the
  ranges are ``data.crop_scale`` / ``data.crop_ratio`` on every backend, so SimKD's recipes set DALI's values. The
  same parameters give the same crop as the other two backends, and a crop-level teacher cache replays them.

Workers still read the files (``FolderDataset`` in bytes mode); images that are not JPEG, or are CMYK, arrive as
decoded pixels and take :class:`kdzoo.data.folder.TorchDeviceAugment`'s crop. DALI is an optional dependency
(``pip install -e '.[dali]'``, the ``nvidia-dali-cuda130`` wheel); without it this module still imports and
``data.loader=dali`` is refused with that instruction (:func:`dali_available`).
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kdzoo.data.folder import FolderPipeline, TorchDeviceAugment
from kdzoo.data.resized_crop import resize_centre_crop_geometry
from kdzoo.errors import UserInputError

try:  # optional extra: kdzoo[dali]
    import nvidia.dali.fn as dali_fn
    import nvidia.dali.types as dali_types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError:  # pragma: no cover - exercised where DALI is not installed
    dali_fn = dali_types = pipeline_def = feed_ndarray = None

DALI_INSTALL_HINT = ("data.loader=dali needs NVIDIA DALI: pip install -e '.[dali]' (the nvidia-dali-cuda130 wheel); "
                     "data.loader=device decodes and augments on the run's device with the same crops")


def dali_available() -> bool:
    return pipeline_def is not None


def _interpolation(name: str):
    return dali_types.INTERP_CUBIC if name == "bicubic" else dali_types.INTERP_LINEAR


class DaliAugment:
    """A :class:`kdzoo.data.folder.DeviceAugment` running one DALI pipeline per loader, fed batch by batch.

    The pipeline runs synchronously (``exec_async=False``): the DataLoader workers already read ahead, and each
    batch's outputs must pair with the labels, indices and cached targets that came with its bytes. A DALI error
    invalidates its pipeline; the batch is then decoded image by image in fresh pipelines so that only the bad
    files are reported (``data.corrupt``)."""

    def __init__(self, pipeline: FolderPipeline, device: torch.device, batch_size: int, num_threads: int = 2):
        if not dali_available():
            raise UserInputError(DALI_INSTALL_HINT)
        self.pipeline, self.device = pipeline, torch.device(device)
        self.batch_size, self.num_threads = batch_size, max(1, num_threads)
        self.fallback = TorchDeviceAugment(pipeline, self.device)
        self._pipe = None

    def __getstate__(self) -> dict:  # a built DALI pipeline cannot be pickled; it is rebuilt where it is used
        return {**self.__dict__, "_pipe": None}

    def __call__(self, payloads: list[Tensor], crops: Tensor, errors: list[str],
                 names: list[str]) -> tuple[Tensor, list[str]]:
        errors = list(errors)
        jpeg = [i for i, p in enumerate(payloads) if not errors[i] and p.dim() == 1]
        pixels = [i for i, p in enumerate(payloads) if not errors[i] and p.dim() == 3]
        size = self.pipeline.size
        out = torch.empty((len(payloads), 3, size, size), dtype=torch.float32, device=self.device)
        if jpeg:
            decoded = self._run_batch([payloads[i] for i in jpeg], crops[jpeg])
            if decoded is not None:
                out[jpeg] = decoded
            else:
                for i in jpeg:
                    try:
                        out[i] = self._run([payloads[i]], crops[i : i + 1])[0]
                    except RuntimeError as exc:
                        errors[i] = f"cannot decode image {names[i]}: {_dali_cause(exc)}"
                        self._pipe = None
        if pixels:  # already decoded by the worker (PNG, CMYK JPEG, ...): the same crop as tensor ops
            out[pixels] = self.fallback.augment([payloads[i].to(self.device) for i in pixels], crops[pixels])
        keep = [i for i, e in enumerate(errors) if not e]
        return out[keep], errors

    def _run_batch(self, payloads: list[Tensor], crops: Tensor) -> Tensor | None:
        try:
            return self._run(payloads, crops)
        except RuntimeError:
            self._pipe = None
            return None

    def _run(self, payloads: list[Tensor], crops: Tensor) -> Tensor:
        if len(payloads) > self.batch_size:  # e.g. the cache builder's in-order pass with its own batch size
            self.batch_size, self._pipe = len(payloads), None
        pipe = self._pipe or self._build()
        self._pipe = pipe
        encoded = [p.numpy() for p in payloads]
        if self.pipeline.crop is not None:  # (y, x) anchor and (height, width) of each crop
            regions = [(np.array([top, left], dtype=np.float32), np.array([h, w], dtype=np.float32), flip)
                       for top, left, h, w, flip in crops.tolist()]
        else:  # (y, x) start and end of each evaluation region
            regions = [(*self._centre_region(data), 0) for data in encoded]
        pipe.feed_input("jpegs", encoded)
        pipe.feed_input("region_a", [a for a, _, _ in regions])
        pipe.feed_input("region_b", [b for _, b, _ in regions])
        pipe.feed_input("flip", [np.array(flip, dtype=np.int32) for _, _, flip in regions])
        (images,) = pipe.run()
        dense = images.as_tensor()
        target = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, target, cuda_stream=stream)
        return target

    def _centre_region(self, encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation's Resize + CenterCrop as one resize of a region of the original image: the central crop
        of the resized image mapped back to source coordinates ((y, x) start and end). Resizing that region to
        ``size`` x ``size`` samples the same grid as resizing the whole image and cropping, with torchvision's
        truncation and rounding of the sizes and offsets (DALI's ``resize_shorter`` and centre crop round in their
        own way: one pixel off on some images)."""
        with Image.open(io.BytesIO(encoded.tobytes())) as img:  # the header only
            width, height = img.size
        size = self.pipeline.size
        new_h, new_w, top, left = resize_centre_crop_geometry(height, width, int(self.pipeline.resize or size), size)
        scale_y, scale_x = height / new_h, width / new_w
        return (np.array([top * scale_y, left * scale_x], dtype=np.float32),
                np.array([(top + size) * scale_y, (left + size) * scale_x], dtype=np.float32))

    def _build(self):
        """decode -> the crop resized to ``size`` x ``size`` (antialiased) -> mirror + normalise, CHW float.

        Training crops, as torchvision's ``resized_crop`` does: the region is cut out (``slice``) and then resized,
        so no pixel outside it contributes. The whole image is decoded, rather than the region only
        (``decoders.image_slice``, what ``image_random_crop`` does): on the photo benchmark the region decode was no
        faster on the CPU and its libjpeg-turbo partial decode differs from a full decode by up to 28 levels at
        block edges; the full decode equals PIL's. DALI's resampler weighs the outermost output pixels differently
        from PIL (up to ~20 levels there on the test photos, within one level inside; docs/config.md).
        Evaluation resizes a region of interest of the whole image instead (:meth:`_centre_region`)."""
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if on_gpu else None
        pipeline = self.pipeline
        training = pipeline.crop is not None
        interpolation = _interpolation(pipeline.interpolation)  # the crop's too (imagenet_pipelines)
        size = pipeline.size

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                      exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def decode_crop_normalise():
            jpegs = dali_fn.external_source(name="jpegs", dtype=dali_types.UINT8)
            region_a = dali_fn.external_source(name="region_a", dtype=dali_types.FLOAT)
            region_b = dali_fn.external_source(name="region_b", dtype=dali_types.FLOAT)
            flip = dali_fn.external_source(name="flip", dtype=dali_types.INT32)
            images = dali_fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=dali_types.RGB)
            # uint8 out of the resize, as PIL's resize and TorchDeviceAugment's rounding give.
            if training:
                images = dali_fn.slice(images, region_a, region_b, axis_names="HW", normalized_anchor=False,
                                       normalized_shape=False)
                images = dali_fn.resize(images, size=[size, size], antialias=True, interp_type=interpolation)
            else:
                images = dali_fn.resize(images, size=[size, size], roi_start=region_a, roi_end=region_b,
                                        roi_relative=False, antialias=True, interp_type=interpolation)
            return dali_fn.crop_mirror_normalize(images, mirror=flip, mean=[255.0 * m for m in pipeline.mean],
                                                 std=[255.0 * s for s in pipeline.std], output_layout="CHW",
                                                 dtype=dali_types.FLOAT)

        pipe = decode_crop_normalise()
        pipe.build()
        return pipe


def _dali_cause(exc: BaseException) -> str:
    """The cause in a DALI error, which also carries the pipeline definition's traceback: what follows its
    "encountered:" line, without the note that the pipeline is invalid now (it is rebuilt)."""
    cause = str(exc).split("encountered:", 1)[-1]
    lines = [line.strip() for line in cause.splitlines() if line.strip() and "no longer valid" not in line]
    text = re.sub(r" sample #\d+", "", " ".join(lines)).rstrip(" :")
    return f"DALI: {text[:300]}" if text else f"DALI: {type(exc).__name__}"
