"""Record the key layout of MVDream's official checkpoint (sd-v2.1-base-4view.pt, hub MVDream/MVDream), and
of a tiny model of the same layout for tests.

The lists are the state dicts of the reference's own model, built from its configuration on the meta device
(no weights, no download): bytedance/MVDream's LatentDiffusionInterface, whose state dict is what the
official file holds (model_zoo.build_model loads it with strict=True).

- official-keys.txt.gz: from mvdream/configs/sd-v2-base.yaml at full size. Its text encoder is built with
  pretrained=None instead of laion2b_s32b_b79k: the same architecture, nothing fetched.
- tiny-keys.txt.gz: from tiny-model.yaml (written here): the same file layout at a tiny size, whose text
  tower is an open_clip model configuration registered here ("threed-tiny-text": width 64, 2 layers, 1
  head). tests/tiny_models.py fills these keys with random tensors to make a tiny MVDream checkpoint.

Both as `key<TAB>shape` lines, gzip-compressed. Usage (the reference needs torch, einops, omegaconf and
open_clip_torch):
    git clone https://github.com/bytedance/MVDream /tmp/mvdream-ref
    python tests/data/mvdream/make_keys.py /tmp/mvdream-ref
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent

TINY_TEXT = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
TINY_MODEL = {"model": {"target": "mvdream.ldm.interface.LatentDiffusionInterface", "params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
    "parameterization": "eps",
    "unet_config": {"target": "mvdream.ldm.modules.diffusionmodules.openaimodel.MultiViewUNetModel", "params": {
        "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 64, "use_checkpoint": False,
        "legacy": False, "camera_dim": 16}},
    "first_stage_config": {"target": "mvdream.ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                     "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                     "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "mvdream.ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {
        "arch": "threed-tiny-text", "version": None, "freeze": True, "layer": "penultimate"}}}}}


def keys(config, instantiate) -> list[str]:  # type: ignore[no-untyped-def]
    with torch.device("meta"):
        model = instantiate(config.model)
    return [f"{k}\t{'x'.join(map(str, v.shape))}" for k, v in model.state_dict().items()]


def write(name: str, lines: list[str]) -> None:
    with gzip.open(HERE / name, "wt") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(lines)} keys; wrote {HERE / name}")


def main(ref_root: str) -> None:
    sys.path.insert(0, ref_root)
    import open_clip
    from mvdream.ldm import interface
    from mvdream.ldm.util import instantiate_from_config

    create = open_clip.create_model_and_transforms  # the reference asks for the CPU; keep it on meta
    open_clip.create_model_and_transforms = lambda *a, **k: create(*a, **{**k, "device": torch.device("meta")})
    schedule = interface.LatentDiffusionInterface.register_schedule  # numpy: on the CPU (small)

    def register_schedule(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.device("cpu"):
            return schedule(self, *args, **kwargs)

    interface.LatentDiffusionInterface.register_schedule = register_schedule

    config = OmegaConf.load(Path(ref_root) / "mvdream" / "configs" / "sd-v2-base.yaml")
    config.model.params.cond_stage_config.params.version = None
    write("official-keys.txt.gz", keys(config, instantiate_from_config))

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "threed-tiny-text.json").write_text(json.dumps(TINY_TEXT))
        open_clip.add_model_config(Path(tmp) / "threed-tiny-text.json")
    (HERE / "tiny-model.yaml").write_text(yaml.safe_dump(TINY_MODEL, sort_keys=False))
    write("tiny-keys.txt.gz", keys(OmegaConf.create(TINY_MODEL), instantiate_from_config))


if __name__ == "__main__":
    main(sys.argv[1])
