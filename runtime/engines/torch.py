"""Torch eager backend: the reference for correctness, and the fallback.

Its "engine" is the sampled tier itself, stored without pickle as ``module.json`` (the
architecture, see ``runtime.inn.graphio``) plus ``module.safetensors``. Needs torch by nature:
the serving image without torch simply reports this backend unavailable.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np

from .base import Backend, BuildOptions, Engine, EngineError, TensorSpec

MODULE_SPEC = "module.json"
MODULE_WEIGHTS = "module.safetensors"


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, module, device: str, dtype, inputs, outputs) -> None:
        self.module, self.device, self.dtype = module, device, dtype
        self.inputs, self.outputs = inputs, outputs
        self._lock = threading.Lock()  # one module; eager forward is not re-entrant on CUDA

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.inputs]
        with self._lock, torch.inference_mode():
            args = [
                a.to(self.device, self.dtype if a.is_floating_point() else a.dtype) for a in args
            ]
            out = self.module(*args)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            arrays = [o.float().cpu().numpy() for o in outs]
        return {s.name: a for s, a in zip(self.outputs, arrays, strict=True)}


class TorchBackend(Backend):
    """``BuildOptions.extra['device']``: 'cpu' (default) or 'cuda'."""

    name = "torch"

    def available(self) -> bool:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False
        return True

    def version(self) -> str:
        import torch

        return torch.__version__

    def device(self) -> str:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return "cpu"

    def build(self, onnx_path: Path, out_dir: Path, options: BuildOptions) -> list[str]:
        src = onnx_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (MODULE_SPEC, MODULE_WEIGHTS):
            if not (src / name).is_file():
                raise EngineError(f"{src / name} is missing; rebuild the tier with innfer build")
            shutil.copyfile(src / name, out_dir / name)
        return [MODULE_SPEC, MODULE_WEIGHTS]

    def load(self, out_dir: Path, options: BuildOptions) -> TorchEngine:
        import json

        import torch
        from safetensors.torch import load_file

        from runtime.inn.graphio import from_spec

        try:
            meta = json.loads((out_dir / MODULE_SPEC).read_text())
            module = from_spec(meta["architecture"], load_file(str(out_dir / MODULE_WEIGHTS)))
        except Exception as exc:
            raise EngineError(f"cannot load the torch module in {out_dir}: {exc}") from exc
        device = options.extra.get("device", "cpu")
        dtype = torch.float16 if options.precision == "fp16" else torch.float32
        module = module.to(device=device, dtype=dtype).eval()
        inputs = [TensorSpec(n, d, tuple(s)) for n, d, s in meta["inputs"]]
        outputs = [TensorSpec(n, d, tuple(s)) for n, d, s in meta["outputs"]]
        return TorchEngine(module, device, dtype, inputs, outputs)
